"""Real TensorRT-RTX engines from the tiny model's `trt-native` graph, built ahead of time on this CPU-only
machine.

fp32 and fp16 exports, for SM 80 and SM 89, with dynamic batch / seq / past in two profiles. Small
profile ranges keep each build to a few seconds (the builder's optimization level makes no measurable
difference at this size, so the default is kept: the engines are built as users build them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.engine.backend import import_backend
from deploy.engine.build import BuildOptions, build_engine
from deploy.engine.meta import IncompatibleEngineError, check_engine_compatible, load_engine_meta
from deploy.engine.report import BuildReport
from export import io_contract as io
from export.config import SLIDING, Gemma2Config
from tests.deploy.build_graphs import optimized

SMALL = {"opt": {"batch": 1, "seq": 16, "past": 32}, "max": {"batch": 2, "seq": 32, "past": 64}}


def expected_matmuls(cfg: Gemma2Config) -> int:
    """q, k, v, o, gate, up, down and the two attention products per layer, plus the lm head."""
    return cfg.num_hidden_layers * 9 + 1


_NATIVE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def native(tiny_export, tmp_path_factory: pytest.TempPathFactory):
    """`native(dtype)` -> the tiny export's trt-native graph (optimized once per dtype)."""

    def get(dtype: str) -> Path:
        if dtype not in _NATIVE:
            out = tmp_path_factory.mktemp(f"trt-native-{dtype}")
            _NATIVE[dtype] = optimized(tiny_export(dtype).model_path, "trt-native", out)
        return _NATIVE[dtype]

    return get


@pytest.fixture(scope="module", params=[("fp32", 80), ("fp32", 89), ("fp16", 80), ("fp16", 89)], ids=str)
def built(request: pytest.FixtureRequest, native, tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    dtype, sm = request.param
    engine = tmp_path_factory.mktemp("engines") / f"tiny-{dtype}-sm{sm}.engine"
    return build_engine(native(dtype), engine, BuildOptions("tensorrt-rtx", (sm,), **SMALL))


def test_engine_and_side_file(built: BuildReport):
    meta = built.meta
    assert built.engine.stat().st_size == meta.engine_bytes > 100_000
    assert built.engine.read_bytes()[:4] == b"vtrt"
    assert meta.backend == "tensorrt-rtx" and meta.trt_version == import_backend("tensorrt-rtx").version
    assert load_engine_meta(built.engine) == meta
    assert built.build_seconds > 0


def test_precision_comes_from_the_onnx(built: BuildReport, request: pytest.FixtureRequest):
    dtype, sm = request.node.callspec.params["built"]
    assert built.meta.dtype == dtype and built.meta.target_sms == (sm,)


def test_report_lists_the_expected_layers(built: BuildReport, tiny_cfg: Gemma2Config):
    layers = built.layers
    assert built.layers_source == "network"
    assert layers["MATRIX_MULTIPLY"] == expected_matmuls(tiny_cfg)
    assert layers["SOFTMAX"] == tiny_cfg.num_hidden_layers
    # tanh: attention soft-cap per layer, the GELU of each MLP, and the final logit soft-cap
    assert layers["ACTIVATION"] == 2 * tiny_cfg.num_hidden_layers + 1
    # one mean of squares per RMSNorm: 4 per layer (sandwich norms) and the final norm
    assert layers["REDUCE"] == 4 * tiny_cfg.num_hidden_layers + 1
    assert built.meta.plugins == {}
    rows = dict(built.rows())
    assert rows["plugins"] == "none" and "MATRIX_MULTIPLY 37" in rows["layers (network)"]


def test_dynamic_profiles(built: BuildReport, tiny_cfg: Gemma2Config):
    prefill, decode = built.meta.profiles
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert prefill["shapes"][io.INPUT_IDS] == [[1, 1], [1, 16], [2, 32]]
    assert decode["shapes"][io.INPUT_IDS] == [[1, 1], [1, 1], [2, 1]]
    kv, d = tiny_cfg.num_key_value_heads, tiny_cfg.head_dim
    for layer, kind in enumerate(tiny_cfg.layer_types):
        past = decode["shapes"][io.past_name(layer, "value")]
        assert past == [[1, kv, 0, d], [1, kv, 32, d], [2, kv, 64, d]], (layer, kind)
    assert decode["shapes"][io.ATTENTION_MASK] == [[1, 1], [1, 33], [2, 65]]
    assert prefill["shapes"][io.ATTENTION_MASK] == [[1, 1], [1, 16], [2, 96]]
    assert SLIDING in tiny_cfg.layer_types  # the sliding layers' own past dim was ranged too
    assert built.ranges["decode"] == {"batch": [1, 1, 2], "seq": [1, 1, 1], "past": [0, 32, 64]}


def test_engine_check_accepts_its_gpu_only(built: BuildReport):
    version = import_backend("tensorrt-rtx").version
    (sm,) = built.meta.target_sms
    assert check_engine_compatible(built.engine, version, sm, "tensorrt-rtx") == built.meta
    other = 89 if sm == 80 else 80
    with pytest.raises(IncompatibleEngineError, match=f"rebuild with --sm {other}"):
        check_engine_compatible(built.engine, version, other)


def test_cli_build_json_and_table(native, tmp_path):
    model_dir = native("fp16").parent
    engine = tmp_path / "cli.engine"
    args = ["build", str(model_dir), "--out", str(engine), "--backend", "tensorrt-rtx", "--sm", "8.9"]
    args += ["--max", "batch=2,seq=32,past=64", "--opt", "seq=8,past=16"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["target_sms"] == [89] and report["dtype"] == "fp16"
    assert report["build"]["ranges"]["prefill"] == {"batch": [1, 1, 2], "seq": [1, 8, 32], "past": [0, 0, 64]}
    assert json.loads((tmp_path / "cli.engine.json").read_text())["engine_sha256"] == report["engine_sha256"]
    table = CliRunner().invoke(cli, [*args, "--opt-level", "0"])
    assert table.exit_code == 0, table.output
    for text in ("g2trt build", "TensorRT-RTX", "SM 89 (Ada", "profile decode", "optimization level 0"):
        assert text in table.output


def test_one_engine_for_several_gpus(native, tmp_path):
    report = build_engine(native("fp32"), tmp_path / "multi.engine", BuildOptions("tensorrt-rtx", (89, 80), **SMALL))
    version = import_backend("tensorrt-rtx").version
    assert report.meta.target_sms == (80, 89)
    for sm in (80, 89):
        check_engine_compatible(report.engine, version, sm)
    with pytest.raises(IncompatibleEngineError, match="this GPU is SM 86"):
        check_engine_compatible(report.engine, version, 86)

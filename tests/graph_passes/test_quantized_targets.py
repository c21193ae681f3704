"""Every target on quantized exports (export/quantize.py): the same site counts as the float export, the
same numbers as the quantized export, and onnxruntime still fusing every DequantizeLinear -> MatMul into
MatMulNBits in the session's optimized graph (this fails if the fusion silently stops).

Bound: each target vs the unoptimized quantized export, both with onnxruntime's optimizations off (the
DequantizeLinear -> MatMul as written): <= 1e-4 (measured ~4e-6).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from deploy.runners.ort_runner import OrtRunner, plugin_session, uses_plugin_ops
from deploy.verify.model import candidate_runner
from deploy.verify.parity import compare, parity_cases
from graph_passes import TARGETS, OptimizeError, optimize
from graph_passes.graph import all_nodes
from graph_passes.targets import SKIPPED_WHEN_QUANTIZED
from tests.cli_errors import one_line_error

_OPTIMIZED: dict[tuple[str | None, str], Path] = {}


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory: pytest.TempPathFactory):
    """`quantized(scheme, target)` -> the tiny export quantized with `scheme` (None: float), optimized for `target`."""

    def get(scheme: str | None, target: str) -> Path:
        if (scheme, target) not in _OPTIMIZED:
            export = tiny_export("fp32", **({"quant": scheme} if scheme else {})).model_path
            out = tmp_path_factory.mktemp(f"{scheme}-{target}")
            _OPTIMIZED[scheme, target] = Path(optimize(export, target, out).model_path)
        return _OPTIMIZED[scheme, target]

    return get


def _sites(model_dir: Path) -> dict[str, int]:
    import json

    return {p["name"]: p["sites"] for p in json.loads((model_dir / "passes.json").read_text())["passes"]}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_same_sites_same_numbers_and_matmulnbits(quantized, tiny_export, tiny_cfg, scheme: str, target: str) -> None:
    path = quantized(scheme, target)
    float_sites = _sites(quantized(None, target).parent)
    skipped = {p.name for group in SKIPPED_WHEN_QUANTIZED.values() for p in group}
    assert _sites(path.parent) == {k: v for k, v in float_sites.items() if k not in skipped}

    reference = OrtRunner(tiny_export("fp32", quant=scheme).model_path, tiny_cfg, optimize=False, name="export")
    candidate = OrtRunner(path, tiny_cfg, optimize=False)
    assert compare(reference, candidate, parity_cases(tiny_cfg)).worst <= 1e-4

    ops = _session_ops(path)
    assert ops["MatMulNBits"] == 7 * tiny_cfg.num_hidden_layers + 1, ops  # every projection and the head
    assert ops["DequantizeLinear"] == 0, ops


def _session_ops(model: Path) -> Counter[str]:
    """Op types of the graph onnxruntime actually runs (its optimized graph, written by the session)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(model.with_name("session_optimized.onnx"))
    so.log_severity_level = 3
    if uses_plugin_ops(model):
        plugin_session(model, so, None)
    else:
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    proto = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return Counter(n.op_type for n in all_nodes(proto.graph))


def test_the_plain_quantized_export_fuses_too(tiny_export, tiny_cfg) -> None:
    for scheme in ("int4", "int8"):
        assert _session_ops(tiny_export("fp32", quant=scheme).model_path)["MatMulNBits"] == 29


@pytest.mark.parametrize("target", ["trt", "trt-native"])
def test_fp8_graphs_for_tensorrt(quantized, tiny_export, tiny_cfg, target: str) -> None:
    path = quantized("fp8", target)
    reference = OrtRunner(tiny_export("fp32", quant="fp8").model_path, tiny_cfg, optimize=False, name="export")
    assert compare(reference, candidate_runner(path, tiny_cfg, "fp32"), parity_cases(tiny_cfg)).worst <= 1e-4


def test_onnxruntime_refuses_fp8_and_bf16_scales(tiny_export, tmp_path: Path) -> None:
    fp8 = tiny_export("fp32", quant="fp8").model_path
    with pytest.raises(OptimizeError, match="fp8 weights are for TensorRT"):
        optimize(fp8, "ort", tmp_path / "fp8")
    line = one_line_error(["optimize", str(fp8), "--target", "ort", "--out", str(tmp_path / "fp8")])
    assert "fp8 weights are for TensorRT (SM 89+)" in line
    bf16 = tiny_export("bf16", quant="int4").model_path
    line = one_line_error(["optimize", str(bf16), "--target", "ort", "--out", str(tmp_path / "bf16")])
    assert "not int4 with bf16 scales" in line and "--dtype fp16" in line
    assert not (tmp_path / "fp8").exists() and not (tmp_path / "bf16").exists()


def test_inplace_contract_quantized_ort_target(tiny_export, tiny_cfg, tmp_path: Path) -> None:
    """The in-place KV cache export quantizes the same way: the ort target fuses every projection and
    computes what the dynamic-contract quantized export computes (teacher-forced logits, optimizations off)."""
    from deploy.runners.ort_runner import OrtInplaceRunner
    from deploy.verify.quality import position_logits, quality_ids

    export = tiny_export("fp32", quant="int4", kv_cache="inplace")
    assert export.manifest["opset"] == 24 and export.manifest["quantization"]["projections"] == 29
    path = Path(optimize(export.model_path, "ort", tmp_path / "ort").model_path)
    assert _session_ops(path)["MatMulNBits"] == 29
    ids = quality_ids(tiny_cfg, 40)
    dynamic = OrtRunner(tiny_export("fp32", quant="int4").model_path, tiny_cfg, optimize=False)
    inplace = OrtInplaceRunner(path, tiny_cfg, optimize=False)
    for stepwise in (False, True):
        diff = position_logits(dynamic, ids, stepwise) - position_logits(inplace, ids, stepwise)
        assert abs(diff).max() <= 1e-4

"""TensorRT-RTX engines from quantized `trt-native` graphs (int4, int8 at SM 80; fp8 at SM 89), built ahead
of time on this CPU-only machine, and the weights staying compressed inside them.

The model is 2 layers of the medium width (hidden 512, intermediate 2048, 8/4 heads) with a small vocab,
so projection weights (15.7 MB fp32 per layer) dominate the engine's ~7 MB of fixed content. A float
engine grows by exactly its weight bytes, so "stayed compressed" is: the quantized engine is smaller than
the float one by what the weights file shrank (within 2 MB), not the same size (weights dequantized at
build). Measured sizes: docs/quantization.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.engine.backend import UnsupportedTargetError
from deploy.engine.build import BuildOptions, build_engine
from deploy.engine.report import BuildReport
from export.config import preset
from export.onnx_export import ExportOptions, export_onnx
from export.weights import RandomWeights
from graph_passes import optimize

SMALL = {"opt": {"batch": 1, "seq": 16, "past": 32}, "max": {"batch": 2, "seq": 32, "past": 64}}
SM = {"fp32": 80, "int8": 80, "int4": 80, "fp8": 89}


def _engines(work: Path) -> dict[str, tuple[int, BuildReport]]:
    """scheme -> (weights file bytes, build report), all from the same random weights."""
    tiny = preset("tiny")
    cfg = tiny.replace(
        num_hidden_layers=2,
        layer_types=tiny.layer_types[:2],
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        vocab_size=512,
    )
    out: dict[str, tuple[int, BuildReport]] = {}
    for scheme, sm in SM.items():
        options = ExportOptions(quant=scheme if scheme != "fp32" else None)  # type: ignore[arg-type]
        export = export_onnx(RandomWeights(cfg), work / scheme / "onnx", options)
        native = optimize(export.model_path, "trt-native", work / scheme / "native")
        engine = work / scheme / "e.engine"
        report = build_engine(native.model_path, engine, BuildOptions("tensorrt-rtx", (sm,), **SMALL))
        out[scheme] = ((work / scheme / "onnx" / "model.onnx.data").stat().st_size, report)
    return out


def test_quantized_engines_keep_the_weights_compressed(tmp_path: Path) -> None:
    """One test (one xdist worker): the four exports and builds are the expensive part."""
    engines = _engines(tmp_path)
    float_data, float_engine = engines["fp32"]
    for scheme in ("int4", "int8", "fp8"):
        data, report = engines[scheme]
        assert report.meta.target_sms == (SM[scheme],) and report.meta.engine_bytes == report.engine.stat().st_size
        shrink_file = float_data - data
        shrink_engine = float_engine.meta.engine_bytes - report.meta.engine_bytes
        assert shrink_file > 0.6 * float_data  # the weights file: int4 -84 %, int8 -69 %, fp8 -72 %
        assert abs(shrink_engine - shrink_file) < 2_000_000, (scheme, shrink_engine, shrink_file)
        assert report.layers["MATRIX_MULTIPLY"] == 2 * 9 + 1  # the quantized GEMMs are still matrix multiplies

    fp8 = Path(engines["fp8"][1].meta.onnx)
    with pytest.raises(UnsupportedTargetError, match=r"fp8 weights need SM 89 or newer \(--sm 86\)"):
        build_engine(fp8, tmp_path / "x.engine", BuildOptions("tensorrt-rtx", (86,)))
    int4 = Path(engines["int4"][1].meta.onnx)
    with pytest.raises(UnsupportedTargetError, match=r"int4 weights need SM 80 or newer \(--sm 75\)"):
        build_engine(int4, tmp_path / "x.engine", BuildOptions("tensorrt-rtx", (75,)))
    assert not (tmp_path / "x.engine").exists()

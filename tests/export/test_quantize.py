"""Weight-only quantization (export/quantize.py): the rounding on hand-made blocks, the exported graph's
form, exactness against a PyTorch model holding the dequantized weights, one read per float weight, and
bad input (one line, exit 1, nothing written).

Bounds: the quantized export with onnxruntime's optimizations off (DequantizeLinear -> MatMul as written)
vs the fp32 PyTorch model whose projections hold exactly the dequantized weights: <= 1e-4 (fp32).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.parity import compare, parity_cases
from export.checkpoint import CheckpointError, open_checkpoint
from export.config import preset
from export.onnx_export import ExportOptions, export_onnx
from export.quantize import PROJECTIONS, QuantError, QuantSpec, dequantize, quantize, quantize_blocks, quantize_fp8
from export.weights import RandomWeights, load_model
from tests.cli_errors import one_line_error

INT4 = QuantSpec("int4", block_size=16)


def test_int4_block_scale_is_chosen_and_codes_round_to_nearest_against_it() -> None:
    rng = np.random.default_rng(4)
    col = np.array([7.0, -3.5, 1.2, 0.0, -7.0, 0.4, 2.5, 2.51] * 2, np.float32)  # one block of 16
    grid = np.array([-8, 7, 3, -2, 0, 5, -6, 1] * 2, np.float32) * 0.5  # on a step-0.5 grid, extreme -8
    cols = [col, -col, grid, np.zeros(16, np.float32), *rng.standard_normal((20, 16)).astype(np.float32)]
    w = np.stack(cols, 1)
    codes, scale = quantize_blocks(w, INT4, np.float32)
    assert scale.shape == (1, w.shape[1]) and (scale > 0).all()
    assert codes.min() >= -8 and codes.max() <= 7
    assert np.array_equal(codes, np.clip(np.rint(w / scale), -8, 7))  # RTN against the stored scale
    err = ((dequantize(codes, scale, INT4) - w) ** 2).sum(0)
    plain = np.maximum(np.abs(w).max(0), 1e-30) / 7  # amax / 7, codes in [-7, 7]
    plain_err = ((np.clip(np.rint(w / plain), -7, 7) * plain - w) ** 2).sum(0)
    assert (err <= plain_err * (1 + 1e-6) + 1e-12).all()  # never worse than plain RTN, block by block
    assert err.sum() < 0.9 * plain_err.sum()
    assert scale[0, 2] == 0.5 and err[2] == 0  # -8 is used: that block is represented exactly
    assert (codes[:, 3] == 0).all() and scale[0, 3] > 0  # an all-zero block keeps a positive scale


def test_int8_block_rounds_to_nearest_with_the_largest_magnitude_at_qmax() -> None:
    col = np.array([127.0, -63.5, 1.2, 0.0, -127.0, 0.4, 2.5, 2.51] * 2, np.float32)
    codes, scale = quantize_blocks(np.stack([col, -col], 1), QuantSpec("int8", block_size=16), np.float32)
    assert scale[0, 0] == scale[0, 1] == 1.0  # amax / 127
    assert codes[:8, 0].tolist() == [127, -64, 1, 0, -127, 0, 2, 3]  # halves round to even
    assert (codes[:, 1] == -codes[:, 0]).all()  # symmetric: no zero point


@pytest.mark.parametrize(("scheme", "bound"), [("int4", 0.09), ("int8", 0.007), ("fp8", 0.04)])
def test_relative_rms_error_on_gaussian_weights(scheme: str, bound: float) -> None:
    w = (np.random.default_rng(0).standard_normal((512, 256)) / np.sqrt(512)).astype(np.float32)
    spec = QuantSpec(scheme)  # type: ignore[arg-type]
    codes, scale = quantize(w, spec, np.float32)
    rel = np.sqrt(np.mean((dequantize(codes, scale, spec) - w) ** 2) / np.mean(w**2))
    assert rel <= bound  # measured: int4 0.086 (0.097 with amax / 7), int8 0.0054, fp8 0.025
    assert (scale > 0).all()


def test_fp8_scales_each_output_column() -> None:
    w = np.array([[1.0, -0.01], [-4.0, 0.02]], np.float32)
    codes, scale = quantize_fp8(w, np.float32)
    assert codes.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_allclose(scale, [4.0 / 448, 0.02 / 448], rtol=1e-6)
    assert codes.astype(np.float32)[1].tolist() == [-448.0, 448.0]


def test_chunked_quantization_of_a_transposed_view_is_exact() -> None:
    e = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)  # a [vocab, hidden] table
    whole = quantize_blocks(np.ascontiguousarray(e.T), QuantSpec("int4"), np.float16)
    chunked = quantize(e.T, QuantSpec("int4"), np.float16, chunk=64 * 7)  # 7 columns at a time
    np.testing.assert_array_equal(chunked[0].astype(np.int8), whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_exported_graph_form(tiny_export, tiny_cfg, scheme: str) -> None:
    result = tiny_export("fp32", quant=scheme)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    model = onnx.load(str(result.model_path), load_external_data=False)
    assert result.manifest["opset"] == 21 and model.opset_import[0].version == 21
    q = result.manifest["quantization"]
    layers = tiny_cfg.num_hidden_layers
    assert q == {
        "scheme": scheme,
        "method": "rtn",
        "scale": "least-squares of the best amax / d" if scheme == "int4" else "amax / qmax",
        "symmetric": True,
        "weights": {"int4": "int4", "int8": "int8", "fp8": "float8e4m3fn"}[scheme],
        "axis": 1 if scheme == "fp8" else 0,
        "block_size": None if scheme == "fp8" else 32,
        "scale_dtype": "fp32",
        "head": True,
        "projections": 7 * layers + 1,
    }
    inits = {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * layers + 1
    for dq in dqs:
        assert len(dq.input) == 2  # no zero point
        codes, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert codes.data_type == {"int4": 22, "int8": 3, "fp8": 17}[scheme]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        k, n = codes.dims
        if scheme == "fp8":
            assert attrs == {"axis": 1} and list(scale.dims) == [n]
        else:
            assert attrs == {"axis": 0, "block_size": 32} and list(scale.dims) == [k // 32, n]
        (matmul,) = [m for m in model.graph.node if dq.output[0] in m.input]
        assert matmul.op_type == "MatMul" and list(matmul.input).index(dq.output[0]) == 1
    names = " ".join(inits)
    for proj in PROJECTIONS:  # no float projection weight is left; the embedding lookup keeps its float table
        assert f"{proj}.weight.T " not in names + " "
    assert inits["model.embed_tokens.weight"].data_type == onnx.TensorProto.FLOAT
    assert "model.embed_tokens.weight.T.scale" in inits
    assert not any(n.op_type == "Transpose" and "model.embed_tokens.weight" in n.input for n in model.graph.node)


def test_weights_file_shrinks(tiny_export) -> None:
    size = {s: (tiny_export("fp32", **kw).model_path.parent / "model.onnx.data").stat().st_size for s, kw in SIZES}
    # tiny: 58 % of the fp32 weights are projections; the 1024 x 64 embedding stays float (+ the head's copy)
    assert size["int4"] < size["int8"] < 0.5 * size["fp32"]
    assert size["fp8"] < size["int8"]  # one scale per column instead of one per 32 rows


SIZES = [("fp32", {}), ("int4", {"quant": "int4"}), ("int8", {"quant": "int8"}), ("fp8", {"quant": "fp8"})]


class _Dequantized:
    """The float weights a quantized export computes with: every projection quantized and dequantized, and
    the head as its own (untied) weight, the dequantized copy of the embedding."""

    def __init__(self, source: RandomWeights, spec: QuantSpec) -> None:
        self.source, self.spec = source, spec
        self.config = source.config.replace(tie_word_embeddings=False)

    def names(self):
        return [*self.source.names(), "lm_head.weight"]

    def get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight":
            return self._dequantized(self.source.get("model.embed_tokens.weight"))
        w = self.source.get(name)
        return self._dequantized(w) if any(f".{p}." in name for p in PROJECTIONS) else w

    def _dequantized(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize(w.t().numpy(), self.spec, np.float32)  # [K, N], as the export stores it
        return torch.from_numpy(np.ascontiguousarray(dequantize(codes, scale, self.spec).T))


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_quantized_export_computes_exactly_the_dequantized_model(tiny_export, tiny_cfg, scheme: str) -> None:
    result = tiny_export("fp32", quant=scheme)
    reference = TorchRunner(load_model(_Dequantized(RandomWeights(tiny_cfg), QuantSpec(scheme))), "dequantized")  # type: ignore[arg-type]
    ort = OrtRunner(result.model_path, tiny_cfg, optimize=False)  # DequantizeLinear -> MatMul as written
    report = compare(reference, ort, parity_cases(tiny_cfg))
    assert report.worst <= 1e-4, report.diffs


class _CountingReads(RandomWeights):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[str] = Counter()

    def get(self, name: str) -> torch.Tensor:
        self.reads[name] += 1
        return super().get(name)


def test_each_float_weight_is_read_once_while_saving(tmp_path: Path) -> None:
    """Codes and scales of a projection come from one read of its float weight, at save time (streamed);
    the head can be left float."""
    tiny = preset("tiny")
    source = _CountingReads(tiny.replace(num_hidden_layers=1, layer_types=tiny.layer_types[:1]))
    result = export_onnx(source, tmp_path / "q", ExportOptions(quant="int4", quant_head=False))
    assert result.manifest["quantization"]["projections"] == 7 and not result.manifest["quantization"]["head"]
    assert set(source.reads) == set(source.names())
    assert set(source.reads.values()) == {1}
    model = onnx.load(str(result.model_path), load_external_data=False)
    head = [n for n in model.graph.node if n.op_type == "Transpose" and "model.embed_tokens.weight" in n.input]
    assert len(head) == 1  # the float head: MatMul(x, Transpose(embedding)), as the float export has it


def test_bf16_export_stores_bf16_scales(tiny_export) -> None:
    result = tiny_export("bf16", quant="int4")
    model = onnx.load(str(result.model_path), load_external_data=False)
    scales = [i for i in model.graph.initializer if i.name.endswith(".scale")]
    assert len(scales) == 29 and all(i.data_type == onnx.TensorProto.BFLOAT16 for i in scales)
    assert result.manifest["quantization"]["scale_dtype"] == "bf16"
    onnx.checker.check_model(str(result.model_path), full_check=True)


def test_block_size_that_does_not_divide_an_input_width(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = one_line_error(["export", "--out", str(out), "--quant", "int4", "--quant-block", "128"])
    assert "--quant-block 128 does not divide the input width 64 of hidden_size" in line
    assert "power of two" in one_line_error(["export", "--out", str(out), "--quant", "int8", "--quant-block", "48"])
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(QuantError, match="does not divide the input width 272 of intermediate_size"):
        export_onnx(RandomWeights(preset("tiny").replace(intermediate_size=272)), out, ExportOptions(quant="int8"))


def test_quant_on_an_already_quantized_model(tiny_export, tmp_path: Path) -> None:
    quantized = tiny_export("fp32", quant="int4").model_path.parent
    out = tmp_path / "again"
    line = one_line_error(["export", str(quantized), "--out", str(out), "--quant", "int4"])
    assert "an int4-quantized g2trt ONNX model, not a Hugging Face checkpoint" in line
    assert not out.exists()


def test_an_already_quantized_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "gptq"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        (ckpt / f.name).symlink_to(f)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match=r"already quantized checkpoint \(quantization_config: gptq\)"):
        open_checkpoint(ckpt)
    assert "already quantized" in one_line_error(["export", str(ckpt), "--out", str(tmp_path / "o"), "--quant", "int8"])
    assert not (tmp_path / "o").exists()


def test_quantizing_a_quantized_graph_is_refused(tiny_export, tiny_cfg) -> None:
    import onnx_ir as ir

    from export.quantize import quantize_graph

    model = ir.load(tiny_export("fp32", quant="int4").model_path)
    with pytest.raises(QuantError, match="already quantized"):
        quantize_graph(model.graph, tiny_cfg, QuantSpec("int8"))

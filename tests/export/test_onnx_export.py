"""The exported ONNX against the PyTorch model in onnxruntime (CPU), and what the export promises:
contract names and dynamic dims, full onnx.checker, manifest, atomic writes, fp16 without overflow.

Bounds (max |logit diff| on valid positions, prefill + 3 decode steps, batch 2 with left padding, a
prompt longer than the window): fp32 <= 1e-4 vs the fp32 PyTorch model; fp16 and bf16 relative to the
reference's largest |logit|, on the tiny model with both soft-caps active (weights x4), where a wrong cap
moves logits by units: fp16 <= 1.5e-2 (measured 8.5e-3), bf16 <= 4e-2 (measured 2.3e-2). The table and how
it was measured: deploy/verify/parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploy.runners.onnx_reference_runner import OnnxReferenceRunner
from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.parity import TOLERANCE, compare, parity_cases, position_ids
from export import io_contract as io
from export.config import SLIDING, preset
from export.manifest import sha256
from export.onnx_export import ExportOptions, export_onnx
from export.weights import RandomWeights, load_model
from tests.conftest import CAPPED_SCALE


def _reference(cfg, seed=0, scale=1.0) -> TorchRunner:
    return TorchRunner(load_model(RandomWeights(cfg, seed=seed, scale=scale)), "torch fp32")


def test_fp32_export_matches_pytorch_in_onnxruntime(tiny_export, tiny_cfg) -> None:
    result = tiny_export("fp32")
    onnx.checker.check_model(str(result.model_path), full_check=True)
    for optimize in (False, True):  # the graph as written, and as onnxruntime rewrites it
        ort = OrtRunner(result.model_path, tiny_cfg, optimize=optimize)
        report = compare(_reference(tiny_cfg), ort, parity_cases(tiny_cfg))
        assert report.prefill <= 1e-4 and report.decode <= 1e-4, report.diffs
        assert len(report.diffs) == 8  # 2 cases x (prefill + 3 decode steps)


def test_contract_names_and_dynamic_dims(tiny_export, tiny_cfg) -> None:
    model = onnx.load(str(tiny_export("fp32").model_path), load_external_data=False)

    def dims(v: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    assert [i.name for i in model.graph.input] == io.input_names(tiny_cfg)
    assert [o.name for o in model.graph.output] == io.output_names(tiny_cfg)
    assert dims(inputs["input_ids"]) == [io.BATCH, io.SEQ]
    assert dims(inputs["attention_mask"]) == [io.BATCH, io.TOTAL]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(inputs["past_key_values.0.key"]) == [io.BATCH, 2, io.SLIDING_PAST, 32]  # layer 0 slides
    assert dims(inputs["past_key_values.1.value"]) == [io.BATCH, 2, io.PAST, 32]
    assert dims(outputs["logits"]) == [io.BATCH, io.SEQ, tiny_cfg.vocab_size]
    assert outputs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # weights live in the external data file under their checkpoint names
    names = {t.name for t in model.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight.T" in names
    assert "model.embed_tokens.weight" in names  # tied: one copy, shared by Gather and the head
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if len(t.dims) == 2)


SHAPES = [
    dict(
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,
        hidden_size=48,
        query_pre_attn_scalar=144,
        sliding_window=5,
    ),
    dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        hidden_size=32,
        sliding_window=3,
        tie_word_embeddings=False,
    ),
    dict(
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=8,
        hidden_size=40,
        sliding_window=7,
        attn_logit_softcapping=None,
    ),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa3-odd-dh-144", "mha-untied", "mqa-5layers-nocap"])
def test_fp32_export_parity_on_random_configs(tmp_path: Path, shape: dict) -> None:
    cfg = preset("tiny").replace(vocab_size=300, intermediate_size=96, **shape)
    src = RandomWeights(cfg, seed=7, scale=2.0)
    result = export_onnx(src, tmp_path)
    report = compare(_reference(cfg, 7, 2.0), OrtRunner(result.model_path, cfg), parity_cases(cfg, seed=3))
    assert report.worst <= 1e-4, report.diffs


def test_norm_weights_are_folded_to_one_plus_weight(tiny_export) -> None:
    """The export folds each RMSNorm's `1 + w` into an initializer named `<weight>.plus_one`."""
    model = onnx.load(str(tiny_export("fp32").model_path))  # with the external data
    src = RandomWeights(preset("tiny"))
    folded = {t.name: t for t in model.graph.initializer if t.name.endswith(".plus_one")}
    assert len(folded) == 4 * 4 + 1  # 4 norms per layer and the final one
    for name, tensor in folded.items():
        w = src.get(name.removesuffix(".plus_one")).float().numpy()
        assert np.abs(w).max() > 0  # random norm weights: 1 + w and w differ
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), 1.0 + w)


def test_trimmed_sliding_cache_runs_through_the_same_graph(tiny_export, tiny_cfg) -> None:
    ort = OrtRunner(tiny_export("fp32").model_path, tiny_cfg)
    w = tiny_cfg.sliding_window
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tiny_cfg.vocab_size, (2, w + 5))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    _, past = ort.forward(ids, mask, position_ids(mask), ort.empty_past(2))
    trimmed = [
        (k[:, :, -(w - 1) :], v[:, :, -(w - 1) :]) if t == SLIDING else (k, v)
        for (k, v), t in zip(past, tiny_cfg.layer_types, strict=True)
    ]
    step = rng.integers(0, tiny_cfg.vocab_size, (2, 1))
    mask = np.concatenate([mask, np.ones((2, 1), dtype=mask.dtype)], 1)
    pos = position_ids(mask)[:, -1:]
    full, _ = ort.forward(step, mask, pos, past)
    short, presents = ort.forward(step, mask, pos, trimmed)
    assert np.abs(full - short).max() <= 1e-5
    assert presents[0][0].shape[2] == w  # sliding layer: window - 1 past + 1 new


def test_last_logits_only_export(tiny_export, tiny_cfg) -> None:
    full = OrtRunner(tiny_export("fp32").model_path, tiny_cfg)
    last = OrtRunner(tiny_export("fp32", last_logits_only=True).model_path, tiny_cfg)
    ids = np.arange(20, dtype=np.int64).reshape(2, 10)
    mask = np.ones_like(ids)
    a, _ = full.forward(ids, mask, position_ids(mask), full.empty_past(2))
    b, _ = last.forward(ids, mask, position_ids(mask), last.empty_past(2))
    assert b.shape == (2, 1, tiny_cfg.vocab_size)
    assert np.abs(a[:, -1:] - b).max() <= 1e-5


def _capped_premise(report) -> None:
    """The reference's logits reach the final cap's range (|logit| > 20 of 30): the caps are in play."""
    assert max(d.ref_max_abs for d in report.diffs) > 20


def test_fp16_export_runs_in_onnxruntime(tiny_export, tiny_cfg) -> None:
    result = tiny_export("fp16", scale=CAPPED_SCALE)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    ort = OrtRunner(result.model_path, tiny_cfg)
    assert ort.kv_dtype == np.float16
    report = compare(_reference(tiny_cfg, scale=CAPPED_SCALE), ort, parity_cases(tiny_cfg))
    _capped_premise(report)
    assert TOLERANCE["fp16"].measure(report) <= TOLERANCE["fp16"].value, report.diffs


def test_bf16_export_checks_and_runs_in_the_onnx_reference_evaluator(tiny_export, tiny_cfg) -> None:
    # onnxruntime's CPU provider has no bf16 kernels; onnx's reference evaluator does.
    result = tiny_export("bf16", scale=CAPPED_SCALE)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    runner = OnnxReferenceRunner(result.model_path, tiny_cfg)
    cases = parity_cases(tiny_cfg)[:1]
    report = compare(_reference(tiny_cfg, scale=CAPPED_SCALE), runner, cases, decode_steps=2)
    _capped_premise(report)
    assert TOLERANCE["bf16"].measure(report) <= TOLERANCE["bf16"].value, report.diffs


class _Overflowing:
    """A tiny untied model whose residual stream and post-norm outputs exceed fp16's 65504, as real
    Gemma 2 checkpoints' do: embeddings x3e4 and post-norm weights ~1e4."""

    def __init__(self) -> None:
        self.config = preset("tiny").replace(tie_word_embeddings=False)
        self._src = RandomWeights(self.config)

    def names(self):
        return self._src.names()

    def describe(self) -> dict:
        return {"kind": "test", "what": "tiny x3e4 embeddings, x1e5 post-norms"}

    def get(self, name: str) -> torch.Tensor:
        w = self._src.get(name)
        if name == "model.embed_tokens.weight":
            return w * 3e4
        if "post_" in name:
            return w * 1e5
        return w


def test_fp16_export_survives_activations_beyond_fp16_range(tmp_path: Path) -> None:
    src = _Overflowing()
    cfg = src.config
    reference = TorchRunner(load_model(src, "fp32"))
    ids = np.arange(2, 12, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    model = load_model(src, "fp32")
    with torch.no_grad():
        h = model.model.embed_tokens(torch.from_numpy(ids)) * cfg.embed_scale
    assert h.abs().max() > 65504  # the premise: fp16 cannot hold this residual stream

    # onnxruntime's CPU provider computes fp16 Mul/Add in fp32 and so hides the overflow; onnx's reference
    # evaluator does fp16 arithmetic in fp16, as GPU kernels and TensorRT do.
    naive = export_onnx(src, tmp_path / "naive", ExportOptions(dtype="fp16", naive_fp16=True))
    faithful = OnnxReferenceRunner(naive.model_path, cfg)
    logits, _ = faithful.forward(ids, mask, position_ids(mask), faithful.empty_past(1))
    assert not np.isfinite(logits).all()  # what HF-style fp16 does with such a model

    ours = export_onnx(src, tmp_path / "ours", ExportOptions(dtype="fp16"))
    cases = parity_cases(cfg)[:1]
    for runner in (OnnxReferenceRunner(ours.model_path, cfg), OrtRunner(ours.model_path, cfg)):
        report = compare(reference, runner, cases, decode_steps=1)
        assert TOLERANCE["fp16"].measure(report) <= TOLERANCE["fp16"].value, (runner.name, report.diffs)


def test_manifest_describes_and_hashes_the_export(tiny_export, tiny_cfg) -> None:
    result = tiny_export("fp32")
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest == result.manifest
    assert manifest["config"]["num_hidden_layers"] == tiny_cfg.num_hidden_layers
    assert manifest["config"]["layer_types"][0] == SLIDING
    assert manifest["dtype"] == "fp32" and manifest["opset"] == 18
    assert [i["name"] for i in manifest["io"]["inputs"]] == io.input_names(tiny_cfg)
    for name, digest in manifest["sha256"].items():
        assert sha256(result.model_path.parent / name) == digest
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(manifest["tools"])
    assert manifest["source"] == {"kind": "random", "seed": 0, "scale": 1.0}


def test_checkpoint_and_random_source_export_the_same_bytes(tiny_export, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from export.checkpoint import open_checkpoint

    result = export_onnx(open_checkpoint(tiny_checkpoint), tmp_path)
    assert result.manifest["sha256"]["model.onnx.data"] == tiny_export("fp32").manifest["sha256"]["model.onnx.data"]
    assert result.manifest["source"] == {"kind": "checkpoint", "path": str(tiny_checkpoint.resolve())}


class _Failing(RandomWeights):
    def get(self, name: str) -> torch.Tensor:
        if name.endswith("down_proj.weight"):
            raise OSError(f"disk read failed for {name}")
        return super().get(name)


def test_failed_export_leaves_the_destination_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous model")
    with pytest.raises(OSError, match="down_proj"):
        export_onnx(_Failing(preset("tiny")), out)
    assert (out / "model.onnx").read_text() == "previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory left behind

"""A replicated export (one traced layer per layer kind, copied for the rest: export/replicate.py) against
a full trace of every layer, for both KV cache contracts, fp32/fp16/bf16 and last-logits-only on and off:

- the same graph up to value and node names (`fingerprint`: ops, attributes, types and shapes, module
  scopes, wiring, weights by content), the same I/O and initializers in the same order;
- the same weights file, byte for byte;
- the same outputs, bit for bit: onnxruntime for fp32 and fp16, onnx's reference evaluator for bf16
  (onnxruntime's CPU provider has no bf16 kernels), on a batch with left padding and a non-empty cache;
- every graph-pass target (trt, ort for both providers, trt-native) rewrites the same sites, labelled by
  the same layers, into graphs of the same ops (the ort target takes no bf16).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from export import io_contract as io
from export.config import GLOBAL, SLIDING, Gemma2Config, preset
from export.onnx_export import ExportOptions, ExportResult, export_onnx
from export.replicate import fingerprint, prefix_config
from export.weights import RandomWeights
from graph_passes.graph import all_nodes
from graph_passes.optimize import optimize_proto
from graph_passes.targets import TARGETS, passes_for
from tests.conftest import CAPPED_SCALE

_NP = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def test_prefix_config_holds_every_layer_kind_once_in_order() -> None:
    tiny = preset("tiny")
    assert prefix_config(preset("2b")).layer_types == (SLIDING, GLOBAL)
    assert prefix_config(tiny.replace(num_hidden_layers=3, layer_types=(GLOBAL,) * 3)).layer_types == (GLOBAL,)
    odd = tiny.replace(num_hidden_layers=5, layer_types=(SLIDING, SLIDING, GLOBAL, SLIDING, GLOBAL))
    assert prefix_config(odd).layer_types == (SLIDING, SLIDING, GLOBAL)


def _both(cfg: Gemma2Config, tmp_path: Path, options: ExportOptions, scale: float = 1.0) -> tuple[ExportResult, ...]:
    src = RandomWeights(cfg, scale=scale)
    replicated = export_onnx(src, tmp_path / "replicated", options)
    full = export_onnx(src, tmp_path / "full", dataclasses.replace(options, full_trace=True))
    return replicated, full


def _same_graph(a: ExportResult, b: ExportResult) -> None:
    ma, mb = ir.load(a.model_path), ir.load(b.model_path)
    assert fingerprint(ma) == fingerprint(mb)
    assert [v.name for v in ma.graph.inputs] == [v.name for v in mb.graph.inputs]
    assert [str(v.shape) for v in ma.graph.inputs] == [str(v.shape) for v in mb.graph.inputs]
    assert [v.name for v in ma.graph.outputs] == [v.name for v in mb.graph.outputs]
    weights = [[n for n, v in m.graph.initializers.items() if n.startswith("model.")] for m in (ma, mb)]
    assert weights[0] == weights[1]
    assert a.manifest["sha256"]["model.onnx.data"] == b.manifest["sha256"]["model.onnx.data"]
    assert a.manifest["io"] == b.manifest["io"]


def _feeds(cfg: Gemma2Config, options: ExportOptions, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch 2, 5 new tokens, row 1 left-padded by 2; a cache of earlier tokens (random keys and values)."""
    rng = np.random.default_rng(seed)
    b, s = 2, 5
    ids = rng.integers(0, cfg.vocab_size, size=(b, s), dtype=np.int64)
    dt = _NP[options.dtype]

    def cache(length: int) -> np.ndarray:
        return rng.standard_normal((b, cfg.num_key_value_heads, length, cfg.head_dim)).astype(dt)

    if options.kv_cache == "inplace":
        pos = np.array([[6, 7, 8, 9, 10], [-2, -1, 0, 1, 2]], dtype=np.int64)
        feeds = {io.INPUT_IDS: ids, io.POSITION_IDS: pos}
        lengths = {SLIDING: cfg.sliding_window, GLOBAL: 24}
    else:
        past = 4
        mask = np.ones((b, past + s), dtype=np.int64)
        mask[1, : past + 2] = 0
        pos = np.maximum(mask.cumsum(1) - 1, 0)[:, past:]
        feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos}
        lengths = {SLIDING: past, GLOBAL: past}
    for i, kind in enumerate(cfg.layer_types):
        for part in ("key", "value"):
            feeds[io.past_name(i, part)] = cache(lengths[kind])
    return feeds


def _run(path: Path, feeds: dict[str, np.ndarray], dtype: str) -> list[np.ndarray]:
    if dtype == "bf16":  # onnxruntime's CPU provider has no bf16 kernels
        return list(ReferenceEvaluator(onnx.load(str(path))).run(None, feeds))  # type: ignore[arg-type]
    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


@pytest.mark.parametrize("last_logits_only", [False, True], ids=["all-logits", "last-logits"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kv_cache", ["dynamic", "inplace"])
def test_replicated_export_equals_a_full_trace(
    tmp_path: Path, kv_cache: str, dtype: str, last_logits_only: bool
) -> None:
    cfg = preset("tiny")  # 4 layers: a sliding and a global layer traced, one of each copied
    options = ExportOptions(dtype=dtype, kv_cache=kv_cache, last_logits_only=last_logits_only)  # type: ignore[arg-type]
    replicated, full = _both(cfg, tmp_path, options, scale=CAPPED_SCALE)  # both soft-caps active
    _same_graph(replicated, full)
    feeds = _feeds(cfg, options)
    outputs = [_run(r.model_path, feeds, dtype) for r in (replicated, full)]
    assert len(outputs[0]) == 1 + 2 * cfg.num_hidden_layers
    for name, a, b in zip(io.output_names(cfg), *outputs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name}: max |diff| {np.abs(a.astype(np.float64) - b).max()}"
    assert np.isfinite(outputs[0][0]).all()
    _same_pass_sites(cfg, replicated, full, dtype)


def _same_pass_sites(cfg: Gemma2Config, a: ExportResult, b: ExportResult, dtype: str) -> None:
    protos = [onnx.load(str(r.model_path), load_external_data=False) for r in (a, b)]
    forms = [(t, "cpu") for t in TARGETS if not (t == "ort" and dtype == "bf16")]
    forms += [("ort", "cuda")] if dtype != "bf16" else []
    for target, provider in forms:
        results = []
        for proto in protos:
            optimized, reports = optimize_proto(proto, passes_for(target, provider), cfg, target)  # checks counts
            ops = Counter(n.op_type for n in all_nodes(optimized.graph))
            results.append(([(r.name, r.sites, r.nodes_before, r.nodes_after) for r in reports], ops))
        assert results[0] == results[1], (target, provider)


def test_replicated_export_of_an_irregular_untied_model(tmp_path: Path) -> None:
    """Layer 0 global, kinds in no fixed period, an untied head: templates are each kind's last traced layer."""
    types = (GLOBAL, SLIDING, SLIDING, GLOBAL, GLOBAL, SLIDING)
    cfg = preset("tiny").replace(num_hidden_layers=6, layer_types=types, tie_word_embeddings=False)
    replicated, full = _both(cfg, tmp_path, ExportOptions())
    _same_graph(replicated, full)
    feeds = _feeds(cfg, ExportOptions())
    for a, b in zip(*(_run(r.model_path, feeds, "fp32") for r in (replicated, full)), strict=True):
        assert a.tobytes() == b.tobytes()

"""lower_attention_ort: what the ort target runs (GroupQueryAttention for one-token steps, the
standard-op core for prompts, chosen by an If) computes exactly what the SlidingWindowAttention reference
computes: left padding (through attention_bias), HF's window (local_window_size = sliding_window),
soft-cap before the mask, first prompt, decode, multi-token steps with a cache in a batch of 2, and a
sliding layer given a trimmed cache (mask wider than its keys)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as h

from graph_passes import insert_sliding_window_attention, lower_attention_ort
from tests.graph_passes.graphs import (
    F16,
    F32,
    FP32_BOUND,
    apply,
    max_output_diff,
    ops,
    prefill_feeds,
    run,
    top_ops,
    vi,
)
from trt_plugins.attention import SPEC

H, KV, D = 4, 2, 16


def _swa_model(window: int, cap: float, elem: int) -> onnx.ModelProto:
    attrs = SPEC.attributes(num_heads=H, kv_heads=KV, head_dim=D, scale=D**-0.5, softcap=cap, window=window)
    node = h.make_node(SPEC.name, [*SPEC.inputs], ["out", "present_key", "present_value"], domain=SPEC.domain, **attrs)
    ins = [
        vi(n, elem, [2, heads, s, D])
        for n, heads, s in (
            ("query", H, "S"),
            ("key", KV, "S"),
            ("value", KV, "S"),
            ("past_key", KV, "P"),
            ("past_value", KV, "P"),
        )
    ]
    ins.append(vi("attention_mask", onnx.TensorProto.INT64, [2, "M"]))
    outs = [
        vi("out", elem, [2, H, "S", D]),
        vi("present_key", elem, [2, KV, "T", D]),
        vi("present_value", elem, [2, KV, "T", D]),
    ]
    g = h.make_graph([node], "swa", ins, outs)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(SPEC.domain, 1)])
    m.ir_version = 10
    return m


def _feeds(seq: int, past: int, extra: int, dtype: type, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {
        n: (rng.standard_normal(s) * 2).astype(dtype)
        for n, s in (
            ("query", (2, H, seq, D)),
            ("key", (2, KV, seq, D)),
            ("value", (2, KV, seq, D)),
            ("past_key", (2, KV, past, D)),
            ("past_value", (2, KV, past, D)),
        )
    }
    mask = np.ones((2, extra + past + seq), np.int64)
    mask[1, : extra + min(3, past + seq - 1)] = 0  # row 1 left-padded (and its trimmed-away prefix)
    return f | {"attention_mask": mask}


STEPS = {  # (seq, past, mask columns beyond past + seq)
    "first prompt": (9, 0, 0),
    "decode": (1, 12, 0),
    "multi-token step with cache": (5, 7, 0),
    "trimmed sliding cache": (1, 3, 6),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize(("window", "cap"), [(0, 0.0), (4, 5.0), (0, 50.0), (3, 0.0)])
@pytest.mark.parametrize("elem", [F32, F16])
def test_gqa_equals_the_reference(step: str, window: int, cap: float, elem: int) -> None:
    m = _swa_model(window, cap, elem)
    lowered, (report,) = apply(m, lower_attention_ort.PASS)
    assert report.count == 1 and "GroupQueryAttention" in ops(lowered) and SPEC.name not in ops(lowered)
    seq, past, extra = STEPS[step]
    feeds = _feeds(seq, past, extra, np.float16 if elem == F16 else np.float32)
    got, want = run(lowered, feeds), run(m, feeds)
    valid = feeds["attention_mask"][:, -seq:].astype(bool)  # padded query rows are undefined by contract
    tol = 1e-2 if elem == F16 else 1e-5  # fp16: a few ulps of outputs up to ~6
    out_got, out_want = (o.transpose(0, 2, 1, 3)[valid].astype(np.float32) for o in (got[0], want[0]))
    np.testing.assert_allclose(out_got, out_want, atol=tol, rtol=tol)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # the cache append is exact


def test_tiny_export_runs_gqa_with_rotary_embedding(tiny_proto, tiny_export, tiny_cfg) -> None:
    lowered, (_, report) = apply(
        tiny_proto, insert_sliding_window_attention.PASS, lower_attention_ort.PASS, config=tiny_cfg
    )
    kinds, top = ops(lowered), top_ops(lowered)
    assert report.count == tiny_cfg.num_hidden_layers
    assert top.count("If") == 4 and top.count("RotaryEmbedding") == 8  # q and k per layer, shared by both branches
    assert "Softmax" not in top and "Neg" not in kinds  # the exported rotate_half is gone too
    for node in (n for n in lowered.graph.node if n.op_type == "If"):
        branch = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        assert branch["else_branch"] == ["GroupQueryAttention"]  # one-token steps: GQA and nothing else
        assert "Softmax" in branch["then_branch"] and "GroupQueryAttention" not in branch["then_branch"]
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, lowered, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

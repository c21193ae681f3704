"""lower_attention_ort: what the ort target runs (GroupQueryAttention for one-token steps, the
standard-op core for prompts, chosen by an If) computes exactly what the SlidingWindowAttention reference
computes: left padding (through attention_bias), HF's window (local_window_size = sliding_window),
soft-cap before the mask, first prompt, decode, multi-token steps with a cache in a batch of 2, and a
sliding layer given a trimmed cache (mask wider than its keys). The score scale is
query_pre_attn_scalar ** -0.5 with query_pre_attn_scalar = 144 != head_dim (27B's), so a lowering that
used head_dim ** -0.5 fails here.

The CUDA form (PASS_CUDA): its GroupQueryAttention carries no input onnxruntime's CUDA kernel rejects,
and it is as exact, on onnxruntime's CPU provider, for padded batches (standard ops) as for unpadded
one-token steps (GroupQueryAttention, the branch checked to be the one taken)."""

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
SCALE = 144**-0.5  # query_pre_attn_scalar 144 (27B), not head_dim 16


def _swa_model(window: int, cap: float, elem: int) -> onnx.ModelProto:
    attrs = SPEC.attributes(num_heads=H, kv_heads=KV, head_dim=D, scale=SCALE, softcap=cap, window=window)
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


def _feeds(seq: int, past: int, extra: int, dtype: type, seed: int = 0, pad: bool = True) -> dict[str, np.ndarray]:
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
    if pad:
        mask[1, : extra + min(3, past + seq - 1)] = 0  # row 1 left-padded (and its trimmed-away prefix)
    return f | {"attention_mask": mask}


STEPS = {  # (seq, past, mask columns beyond past + seq)
    "first prompt": (9, 0, 0),
    "decode": (1, 12, 0),
    "multi-token step with cache": (5, 7, 0),
    "trimmed sliding cache": (1, 3, 6),
}


def _check(lowered: onnx.ModelProto, m: onnx.ModelProto, feeds: dict[str, np.ndarray], elem: int) -> None:
    seq = feeds["query"].shape[2]
    got, want = run(lowered, feeds), run(m, feeds)
    valid = feeds["attention_mask"][:, -seq:].astype(bool)  # padded query rows are undefined by contract
    tol = 1e-2 if elem == F16 else 1e-5  # fp16: a few ulps of outputs up to ~6
    out_got, out_want = (o.transpose(0, 2, 1, 3)[valid].astype(np.float32) for o in (got[0], want[0]))
    np.testing.assert_allclose(out_got, out_want, atol=tol, rtol=tol)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # the cache append is exact


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize(("window", "cap"), [(0, 0.0), (4, 5.0), (0, 50.0), (3, 0.0)])
@pytest.mark.parametrize("elem", [F32, F16])
def test_gqa_equals_the_reference(step: str, window: int, cap: float, elem: int) -> None:
    m = _swa_model(window, cap, elem)
    lowered, (report,) = apply(m, lower_attention_ort.PASS)
    assert report.count == 1 and "GroupQueryAttention" in ops(lowered) and SPEC.name not in ops(lowered)
    seq, past, extra = STEPS[step]
    _check(lowered, m, _feeds(seq, past, extra, np.float16 if elem == F16 else np.float32), elem)


def test_the_scale_is_the_nodes_not_head_dims() -> None:
    """GQA takes the node's scale (query_pre_attn_scalar ** -0.5), which differs from head_dim ** -0.5 here."""
    lowered, _ = apply(_swa_model(4, 5.0, F32), lower_attention_ort.PASS)
    (gqa,) = (n for n in _all_nodes(lowered) if n.op_type == "GroupQueryAttention")
    scale = next(h.get_attribute_value(a) for a in gqa.attribute if a.name == "scale")
    assert scale == pytest.approx(SCALE) and scale != pytest.approx(D**-0.5)


def _all_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    from graph_passes.graph import all_nodes

    return all_nodes(m.graph)


def _if_condition(lowered: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """The value of the If's condition for `feeds` (True: the standard-op branch)."""
    (node,) = (n for n in lowered.graph.node if n.op_type == "If")
    probe = onnx.ModelProto()
    probe.CopyFrom(lowered)
    probe.graph.output.append(h.make_tensor_value_info(node.input[0], onnx.TensorProto.BOOL, None))
    return bool(run(probe, feeds)[-1].all())


def test_cuda_form_gives_group_query_attention_no_input_the_cuda_kernel_rejects() -> None:
    lowered, (report,) = apply(_swa_model(4, 5.0, F16), lower_attention_ort.PASS_CUDA)
    assert report.name == "lower_attention_ort_cuda" and report.count == 1
    (gqa,) = (n for n in _all_nodes(lowered) if n.op_type == "GroupQueryAttention")
    given = [i for i, name in enumerate(gqa.input) if name]
    assert given == list(range(len(lower_attention_ort.CUDA_GQA_INPUTS)))  # query .. total_sequence_length
    assert len(gqa.input) <= 10  # in particular no attention_bias (input 10) and no query_seqlens (16)
    cpu, _ = apply(_swa_model(4, 5.0, F16), lower_attention_ort.PASS)
    (cpu_gqa,) = (n for n in _all_nodes(cpu) if n.op_type == "GroupQueryAttention")
    assert cpu_gqa.input[10] and cpu_gqa.input[16]  # the CPU form does use both


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize(("window", "cap", "elem"), [(4, 5.0, F32), (0, 50.0, F16), (3, 0.0, F16)])
def test_cuda_form_equals_the_reference(step: str, pad: bool, window: int, cap: float, elem: int) -> None:
    m = _swa_model(window, cap, elem)
    lowered, _ = apply(m, lower_attention_ort.PASS_CUDA)
    seq, past, extra = STEPS[step]
    feeds = _feeds(seq, past, extra, np.float16 if elem == F16 else np.float32, pad=pad)
    assert _if_condition(lowered, feeds) == (pad or seq > 1)  # GQA exactly for unpadded one-token steps
    _check(lowered, m, feeds, elem)


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

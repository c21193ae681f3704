"""lower_attention_ort: SlidingWindowAttention -> If(prompt: standard ops, one token: GroupQueryAttention).

    q_lin ─ RotaryEmbedding(position_ids) ─> q3 ─┐
    k_lin ─ RotaryEmbedding(position_ids) ─> k3 ─┤
    v_lin ──────────────────────────────────> v3 ─┤
                                                  If(S > 1)
                                                  ├ then: expand_attention's core on the [B, N, S, Dh] views
                                                  └ else: GroupQueryAttention(q3, k3, v3, past_key, past_value,
                                                          seqlens_k, total_sequence_length, attention_bias,
                                                          query_seqlens)
                                                  └─> out [B, S, H*Dh] ─ o_proj  (+ present_key, present_value)

    GroupQueryAttention attrs: num_heads, kv_num_heads, scale, softcap,
                               local_window_size = window (HF sliding_window; -1 for global)

Why both: on CPU, GroupQueryAttention's soft-cap path is slow over a prompt (a 256-token layer takes
2.5x as long with softcap = 50 as without; benchmarks/ort_targets/gqa_softcap.md), slower than the
standard-op core onnxruntime runs with its own fused MatMuls, while for one decoded token GQA is the
faster of the two. The If picks per step; mask inputs both branches or several layers share stay in
the main graph (graph_passes/branches.py). Measured in benchmarks/ort_targets/results.md.

How left padding stays exact (measured against trt_plugins.attention.reference, see
tests/graph_passes/test_lower_attention_ort.py): GQA's own padding model is right padding
(`seqlens_k` per row), so every row is declared full (`seqlens_k = P + S - 1`,
`total_sequence_length = P + S`, `query_seqlens = S`, which also lifts GQA's batch-1 limit on
multi-token steps with a cache), and the padding goes in `attention_bias` [B, 1, S, T]: 0 where
`attention_mask[:, -T:]` is 1, the dtype's lowest value where it is 0 — a finite bias like the
model's, so a fully padded query row stays finite. onnxruntime applies the bias after the soft-cap
and its window is exactly HF's (key > query - window) with `local_window_size = sliding_window`.

CUDA form (`PASS_CUDA`, `g2trt optimize --target ort --provider cuda`): onnxruntime's CUDA kernel
rejects `attention_bias` ("not supported in GroupQueryAttention cuda kernel") and reads none of the
inputs after `total_sequence_length` that this lowering uses (`query_seqlens`), so its GQA gets only
inputs 0-6 (`CUDA_GQA_INPUTS`). Without a bias GQA cannot mask left padding, so its If takes GQA only
for one token of a batch without padding (`S == 1` and `ReduceMin(attention_mask) == 1`) and the
standard-op core otherwise: exact for padded batches, fused for the common unpadded decode.

Rotary: GQA's built-in rotary (`do_rotary`) reads positions from the cache slot (or, in a first
prompt, only position_ids' first element), which is wrong for left-padded rows, so RoPE runs as
RotaryEmbedding on the packed projection with the real `position_ids` (tables up to
max_position_embeddings). When the RoPE pattern is not found the query/key are transposed to
[B, S, N*Dh] instead. The mask inputs are built once per cache-length group of layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import branches, expand_attention, primitives, rope
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject, maybe_producer
from trt_plugins.attention import SPEC

GQA = "GroupQueryAttention"
ROTARY = "RotaryEmbedding"
MS_DOMAIN = "com.microsoft"
IFS = "lower_attention_ort.ifs"  # memo: the If of each site, filled by finish()
# GroupQueryAttention inputs onnxruntime's CUDA kernel accepts here: query .. total_sequence_length (it
# rejects attention_bias; cos/sin/position_ids are for do_rotary, which is off)
CUDA_GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length")


@dataclasses.dataclass(frozen=True)
class Lowering:
    node: gs.Node
    max_positions: int | None  # RoPE table size; None: keep RoPE as it is (no config)


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.domain != SPEC.domain:
        raise Reject(f"{node.name} is not in domain {SPEC.domain}")
    for t in node.inputs[:5]:
        if primitives.dtype_of(t) not in (None, np.dtype(np.float32), np.dtype(np.float16)):
            raise Reject(f"{t.name} is {t.dtype}: onnxruntime's CPU GroupQueryAttention runs fp32 and fp16")
    return Site(None, [node], Lowering(node, config.max_position_embeddings if config else None))


def rewrite(g: PassGraph, site: Site) -> None:
    _rewrite(g, site, cuda=False)


def rewrite_cuda(g: PassGraph, site: Site) -> None:
    _rewrite(g, site, cuda=True)


def _rewrite(g: PassGraph, site: Site, cuda: bool) -> None:
    low: Lowering = site.data
    node = low.node
    a = SPEC.parse(node.attrs)
    h, kv, d = int(a["num_heads"]), int(a["kv_heads"]), int(a["head_dim"])
    query, key, value, past_key, past_value, mask = node.inputs
    out, present_k, present_v = node.outputs
    g.detach(node)
    dtype = primitives.dtype_of(query) or np.dtype(np.float32)
    q3 = _packed(g, query, h, d, low.max_positions, node)
    k3 = _packed(g, key, kv, d, low.max_positions, node)
    v3 = _packed(g, value, kv, d, None, node)
    seqlens, total, qlens, bias = _aux(g, q3, past_key, mask, dtype, node)
    inputs = [q3, k3, v3, past_key, past_value, seqlens, total, None, None, None, bias]
    inputs += [None] * 5 + [qlens]  # head_sink, k_scale, v_scale, q_norm_weight, k_norm_weight, query_seqlens
    if cuda:  # the unused bias and query lengths are dropped by the driver's cleanup
        inputs = inputs[: len(CUDA_GQA_INPUTS)]
    o3 = _packed_output(g, out, h, d)
    result = o3 if o3 is not None else g.variable(f"{node.name}/attn_out", dtype)
    gqa = [g.variable(f"{node.name}/gqa_{n}", dtype) for n in ("out", "present_key", "present_value")]
    g.node(
        GQA,
        inputs,
        gqa,
        like=node,
        domain=MS_DOMAIN,
        num_heads=h,
        kv_num_heads=kv,
        scale=float(a["scale"]),
        softcap=float(a["softcap"]),
        local_window_size=int(a["window"]) or -1,
        do_rotary=0,
    )
    full = _decomposed(g, node, [q3, k3, v3, past_key, past_value, mask], h, kv, d, dtype)
    cond = _multi_token_or_padded(g, q3, mask, node) if cuda else _multi_token(g, q3, node)
    g.memo.setdefault(IFS, []).append(branches.make_if(g, cond, full, gqa, [result, present_k, present_v], like=node))
    if o3 is None:  # no o_proj reshape to feed directly: back to [B, H, S, Dh]
        o4 = g.op("Reshape", [result, g.constant("shape", np.array([0, 0, h, d], np.int64))], like=node, dtype=dtype)
        g.node("Transpose", [o4], [out], like=node, perm=[0, 2, 1, 3])


def _decomposed(
    g: PassGraph, node: gs.Node, inputs: list[gs.Tensor], h: int, kv: int, d: int, dtype: np.dtype
) -> list[gs.Tensor]:
    """The attention as standard ops (expand_attention's), on the packed projections; [out3, present_k, present_v]."""
    q3, k3, v3, past_key, past_value, mask = inputs

    def heads(t: gs.Tensor, n: int) -> gs.Tensor:  # [B, S, n*Dh] -> [B, n, S, Dh]
        shape = g.constant("shape", np.array([0, 0, n, d], np.int64))
        bsnd = g.op("Reshape", [t, shape], like=node, dtype=dtype)
        return g.op("Transpose", [bsnd], like=node, dtype=dtype, perm=[0, 2, 1, 3])

    out4 = g.variable(f"{node.name}/full_out4", dtype)
    present = [g.variable(f"{node.name}/full_{n}", dtype) for n in ("present_key", "present_value")]
    core = g.node(
        SPEC.name,
        [heads(q3, h), heads(k3, kv), heads(v3, kv), past_key, past_value, mask],
        [out4, *present],
        like=node,
        domain=SPEC.domain,
        **node.attrs,
    )
    expand_attention.rewrite(g, Site(None, [core], core))  # detaches core: branches ignores it as a user
    bshd = g.op("Transpose", [out4], like=node, dtype=dtype, perm=[0, 2, 1, 3])
    out3 = g.op("Reshape", [bshd, g.constant("shape", np.array([0, 0, h * d], np.int64))], like=node, dtype=dtype)
    return [out3, *present]


def _multi_token(g: PassGraph, packed_q: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """`S > 1` (a prompt or a multi-token step), computed once: the condition of every layer's If."""
    if "multi_token" not in g.memo:
        s = primitives.dim(g, packed_q, 1, like)
        g.memo["multi_token"] = g.op("Greater", [s, g.constant("one", [1], np.int64)], like=like, dtype=np.bool_)
    return g.memo["multi_token"]


def _multi_token_or_padded(g: PassGraph, packed_q: gs.Tensor, mask: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """`S > 1 or min(attention_mask) == 0`, computed once: the CUDA form's condition for the standard ops."""
    key = ("multi_token_or_padded", mask.name)
    if key not in g.memo:
        lowest = g.op("ReduceMin", [mask], like=like, dtype=np.int64, keepdims=0)  # every axis: a scalar
        padded = g.op("Equal", [lowest, g.constant("zero", np.array(0, np.int64))], like=like, dtype=np.bool_)
        multi = _multi_token(g, packed_q, like)
        g.memo[key] = g.op("Or", [multi, padded], like=like, dtype=np.bool_)
    return g.memo[key]


def finish(g: PassGraph) -> None:
    branches.move_into_branches(g, g.memo.get(IFS, []))


def _packed(g: PassGraph, t: gs.Tensor, heads: int, d: int, max_positions: int | None, like: gs.Node) -> gs.Tensor:
    """`t` [B, N, S, Dh] as [B, S, N*Dh]: the projection itself when possible (RoPE re-done by RotaryEmbedding)."""
    if max_positions is not None:
        try:
            r = rope.match(t, heads, d)
        except Reject:
            r = None
        if r is not None:
            key = ("rope", r.inv_freq.tobytes(), r.dtype.str, max_positions)
            if key not in g.memo:
                cos, sin = rope.tables(r.inv_freq, max_positions, r.dtype)
                g.memo[key] = (g.constant("rope_cos_cache", cos), g.constant("rope_sin_cache", sin))
            cos_c, sin_c = g.memo[key]
            return g.op(
                ROTARY,
                [r.linear, r.position_ids, cos_c, sin_c],
                like=like,
                domain=MS_DOMAIN,
                dtype=t.dtype,
                interleaved=0,
            )
    tr = maybe_producer(t, "Transpose")
    if tr is not None and list(tr.attrs.get("perm", [])) == [0, 2, 1, 3]:
        reshape = maybe_producer(tr.inputs[0], "Reshape")
        shape = reshape.outputs[0].shape if reshape is not None else None
        if reshape is not None and shape is not None and len(shape) == 4 and shape[2:] == [heads, d]:
            return reshape.inputs[0]
    bsnd = g.op("Transpose", [t], like=like, dtype=t.dtype, perm=[0, 2, 1, 3])
    return g.op("Reshape", [bsnd, g.constant("shape", np.array([0, 0, heads * d], np.int64))], like=like, dtype=t.dtype)


def _packed_output(g: PassGraph, out: gs.Tensor, h: int, d: int) -> gs.Variable | None:
    """The [B, S, H*Dh] tensor the model makes of `out` (Transpose then Reshape), if that is its only use."""
    users = list(out.outputs)
    if len(users) != 1 or users[0].op != "Transpose" or list(users[0].attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    t_users = list(users[0].outputs[0].outputs)
    if len(t_users) != 1 or t_users[0].op != "Reshape":
        return None
    reshape = t_users[0]
    shape = reshape.outputs[0].shape
    if shape is None or len(shape) != 3 or shape[2] != h * d or g.is_output(out):
        return None
    packed = reshape.outputs[0]
    g.detach(reshape)
    return packed


def _aux(
    g: PassGraph, packed_q: gs.Tensor, past_key: gs.Tensor, mask: gs.Tensor, dtype: np.dtype, like: gs.Node
) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor, gs.Tensor]:
    """seqlens_k, total_sequence_length, query_seqlens and attention_bias for one cache-length group.

    Sizes come from the packed query [B, S, H*Dh] GQA reads anyway (a Shape of the unpacked one would
    keep its transposes alive).
    """
    length = past_key.shape[2] if past_key.shape is not None and len(past_key.shape) == 4 else None
    key = ("gqa_aux", length if isinstance(length, str) else past_key.name, dtype.str)
    if key in g.memo:
        return g.memo[key]
    i32 = np.int32
    b = primitives.dim(g, packed_q, 0, like)
    s = primitives.dim(g, packed_q, 1, like)
    t = g.op("Add", [primitives.dim(g, past_key, 2, like), s], like=like, dtype=np.int64, shape=[1])
    last = g.op("Sub", [t, g.constant("one", [1], np.int64)], like=like, dtype=np.int64, shape=[1])
    seqlens = primitives.cast(g, g.op("Expand", [last, b], like=like, dtype=np.int64), i32, like)
    total = primitives.cast(g, primitives.scalar_of(g, t, like), i32, like)
    qlens = primitives.cast(g, g.op("Expand", [s, b], like=like, dtype=np.int64), i32, like)
    pad = primitives.cast(g, primitives.last_columns(g, mask, t, like), np.bool_, like)  # [B, T]
    lo = g.constant("bias_min", np.array(np.finfo(dtype).min, dtype))
    bias = g.op("Where", [pad, g.constant("bias_zero", np.array(0, dtype)), lo], like=like, dtype=dtype)
    bias = g.op("Unsqueeze", [bias, g.constant("axes12", [1, 2], np.int64)], like=like, dtype=dtype)
    shape = g.op("Concat", [b, g.constant("one", [1], np.int64), s, t], like=like, dtype=np.int64, axis=0)
    bias = g.op("Expand", [bias, shape], like=like, dtype=dtype)  # [B, 1, S, T]: GQA wants S rows
    g.memo[key] = (seqlens, total, qlens, bias)
    return g.memo[key]


PASS = Pass(
    name="lower_attention_ort", anchors=(SPEC.name,), match=match, rewrite=rewrite, finish=finish, doc=__doc__ or ""
)
# the same lowering for onnxruntime's CUDA provider (see "CUDA form" above); the pass report names it apart
PASS_CUDA = dataclasses.replace(PASS, name="lower_attention_ort_cuda", rewrite=rewrite_cuda)
run = PASS.__call__

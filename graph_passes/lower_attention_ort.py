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
from graph_passes import branches, expand_attention, inplace_ops, primitives, rope
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject, const_array, maybe_producer
from trt_plugins.attention import SPEC
from trt_plugins.attention_inplace import SPEC as INPLACE

GQA = "GroupQueryAttention"
ROTARY = "RotaryEmbedding"
MS_DOMAIN = "com.microsoft"
IFS = "lower_attention_ort.ifs"  # memo: the If of each site, filled by finish()
INNER_IFS = "lower_attention_ort.inner_ifs"  # memo: Ifs inside those (in-place: a first prompt's attention)
MASK_IFS = "lower_attention_ort.mask_ifs"  # memo: in-place: one If per group of layers, its standard-op masks
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
    if node.op == INPLACE.name:
        rewrite_inplace(g, low)
        return
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


def rewrite_inplace(g: PassGraph, low: Lowering) -> None:
    """The in-place cache: If(one token on a buffer that holds positions unwrapped: GroupQueryAttention, which
    rotates q/k itself and writes the shared buffer; else: RotaryEmbedding, the circular TensorScatter and
    standard-op attention). What only the else branch needs is built per site (its rotary, writes), so it
    moves into that branch and a GQA step never runs it; its masks are built once per group of layers,
    behind an If of the same condition (_gated_masks)."""
    node = low.node
    a = INPLACE.parse(node.attrs)
    h, kv, d, window = int(a["num_heads"]), int(a["kv_heads"]), int(a["head_dim"]), int(a["window"])
    query, key, value, past_key, past_value, pos = node.inputs
    out, present_k, present_v = node.outputs
    g.detach(node)
    dtype = primitives.dtype_of(query) or np.dtype(np.float32)
    sources = _rope_sources(g, query, key, h, kv, d, low.max_positions)
    v3 = _packed(g, value, kv, d, None, node)
    seqlens, total = _inplace_lengths(g, pos, node)
    o3 = _packed_output(g, out, h, d)
    result = o3 if o3 is not None else g.variable(f"{node.name}/attn_out", dtype)
    gqa = [g.variable(f"{node.name}/gqa_{n}", dtype) for n in ("out", "present_key", "present_value")]
    attrs = {
        "num_heads": h,
        "kv_num_heads": kv,
        "scale": float(a["scale"]),
        "softcap": float(a["softcap"]),
        "local_window_size": window or -1,
    }
    if sources is not None:  # GQA rotates the raw projections itself, at each row's position (seqlens_k)
        q_lin, k_lin, (cos, sin) = sources
        packed = _packed_qkv(q_lin, k_lin, v3, h, kv, d)
        qkv = [packed, None, None] if packed is not None else [q_lin, k_lin, v3]
        inputs = [*qkv, past_key, past_value, seqlens, total, cos, sin]
        g.node(GQA, inputs, gqa, like=node, domain=MS_DOMAIN, do_rotary=1, rotary_interleaved=0, **attrs)
        rope_pos = _rope_positions(g, pos, node)
        q3 = g.op(ROTARY, [q_lin, rope_pos, cos, sin], like=node, domain=MS_DOMAIN, dtype=dtype, interleaved=0)
        k3 = g.op(ROTARY, [k_lin, rope_pos, cos, sin], like=node, domain=MS_DOMAIN, dtype=dtype, interleaved=0)
    else:  # no recognisable RoPE: rotate as the graph does, for both branches
        q3, k3 = _packed(g, query, h, d, None, node), _packed(g, key, kv, d, None, node)
        g.node(GQA, [q3, k3, v3, past_key, past_value, seqlens, total], gqa, like=node, domain=MS_DOMAIN, **attrs)
    q4, k4, v4 = (_heads(g, t, n, d, dtype, node) for t, n in ((q3, h), (k3, kv), (v3, kv)))
    full = [g.variable(f"{node.name}/full_{n}", dtype) for n in ("present_key", "present_value")]
    inplace_ops.write(g, "circular", past_key, k4, pos, full[0], node, shared=False)
    inplace_ops.write(g, "circular", past_value, v4, pos, full[1], node, shared=False)
    cond = _gqa_step(g, pos, past_key, node)
    masks = _gated_masks(g, cond, pos, past_key, window, node)
    out3 = _prompt_attention(g, node, a, q4, k4, v4, full, pos, masks, dtype)
    g.memo.setdefault(IFS, []).append(
        branches.make_if(g, cond, gqa, [out3, *full], [result, present_k, present_v], like=node)
    )
    if o3 is None:
        o4 = g.op("Reshape", [result, g.constant("shape", np.array([0, 0, h, d], np.int64))], like=node, dtype=dtype)
        g.node("Transpose", [o4], [out], like=node, perm=[0, 2, 1, 3])


def _prompt_attention(
    g: PassGraph,
    node: gs.Node,
    a: dict,
    q4: gs.Tensor,
    k4: gs.Tensor,
    v4: gs.Tensor,
    present: list[gs.Variable],
    pos: gs.Tensor,
    masks: Masks,
    dtype: np.dtype,
) -> gs.Tensor:
    """The standard-op attention of a multi-token step, [B, S, H*Dh]: If(no row continues a sequence:
    this step's own keys alone, S of them, as the dynamic contract computes a first prompt; else: the
    written buffer (global) or the ring's older entries plus the step's keys (sliding), each only the
    slots the step can see (inplace_ops.read_slots))."""
    h, d, window = int(a["num_heads"]), int(a["head_dim"]), int(a["window"])

    def packed(out4: gs.Tensor) -> gs.Tensor:
        bshd = g.op("Transpose", [out4], like=node, dtype=dtype, perm=[0, 2, 1, 3])
        return g.op("Reshape", [bshd, g.constant("shape", np.array([0, 0, h * d], np.int64))], like=node, dtype=dtype)

    fresh_out = g.variable(f"{node.name}/fresh_out4", dtype)
    inplace_ops.attention(g, q4, [k4], [v4], masks.fresh, a, fresh_out, node)
    general_out = g.variable(f"{node.name}/general_out4", dtype)
    read = [inplace_ops.slots_of(g, p, masks.slots, node) for p in present]  # the slots the mask covers
    blocks = ([read[0], k4], [read[1], v4]) if window else ([read[0]], [read[1]])
    inplace_ops.attention(g, q4, blocks[0], blocks[1], masks.circular, a, general_out, node)
    i64 = np.int64
    first = g.op("Slice", [pos, g.constant("start", [0], i64), g.constant("end", [1], i64),
                           g.constant("axis1", [1], i64)], like=node, dtype=i64)  # fmt: skip
    top = g.op("ReduceMax", [first], like=node, dtype=i64, keepdims=0)
    fresh = g.op("LessOrEqual", [top, g.constant("zero", np.array(0, i64))], like=node, dtype=np.bool_, shape=[])
    out3 = g.variable(f"{node.name}/prompt_out", dtype)
    g.memo.setdefault(INNER_IFS, []).append(
        branches.make_if(g, fresh, [packed(fresh_out)], [packed(general_out)], [out3], like=node)
    )
    return out3


def _rope_sources(
    g: PassGraph, query: gs.Tensor, key: gs.Tensor, h: int, kv: int, d: int, max_positions: int | None
) -> tuple[gs.Tensor, gs.Tensor, tuple[gs.Tensor, gs.Tensor]] | None:
    """(q before RoPE [B, S, H*Dh], k before RoPE, the cos/sin tables) when both follow the export's RoPE."""
    if max_positions is None:
        return None
    try:
        rq, rk = rope.match(query, h, d), rope.match(key, kv, d)
    except Reject:
        return None
    if not np.array_equal(rq.inv_freq, rk.inv_freq):
        return None
    table_key = ("rope", rq.inv_freq.tobytes(), rq.dtype.str, max_positions)
    if table_key not in g.memo:
        cos, sin = rope.tables(rq.inv_freq, max_positions, rq.dtype)
        g.memo[table_key] = (g.constant("rope_cos_cache", cos), g.constant("rope_sin_cache", sin))
    return rq.linear, rk.linear, g.memo[table_key]


def _packed_qkv(q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, h: int, kv: int, d: int) -> gs.Tensor | None:
    """The one [B, S, (H + 2 KV) Dh] projection q, k, v are split from (fuse_parallel_matmuls), if they are."""
    split = maybe_producer(q, "Split")
    if (
        split is None
        or len(split.outputs) != 3
        or [t is o for t, o in zip((q, k, v), split.outputs, strict=True)] != [True] * 3
    ):
        return None
    if int(split.attrs.get("axis", 0)) not in (-1, 2) or len(split.inputs) < 2:
        return None
    sizes = const_array(split.inputs[1])
    if sizes is None or [int(x) for x in sizes.reshape(-1)] != [h * d, kv * d, kv * d]:
        return None
    return split.inputs[0]


def _heads(g: PassGraph, t: gs.Tensor, n: int, d: int, dtype: np.dtype, like: gs.Node) -> gs.Tensor:
    """[B, S, n*Dh] -> [B, n, S, Dh]."""
    bsnd = g.op("Reshape", [t, g.constant("shape", np.array([0, 0, n, d], np.int64))], like=like, dtype=dtype)
    return g.op("Transpose", [bsnd], like=like, dtype=dtype, perm=[0, 2, 1, 3])


def _rope_positions(g: PassGraph, pos: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """position_ids with padding (negative) clamped to 0: RotaryEmbedding indexes its tables with them,
    and what padding rotates to is never attended."""
    if "rope_positions" not in g.memo:
        g.memo["rope_positions"] = g.op(
            "Max", [pos, g.constant("zero", np.array(0, np.int64))], like=like, dtype=np.int64
        )
    return g.memo["rope_positions"]


def _inplace_lengths(g: PassGraph, pos: gs.Tensor, like: gs.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """GroupQueryAttention's seqlens_k (each row's last position: one token, the rest of the row before
    it) and total_sequence_length (the longest row), for the shared buffer. GQA runs only on one-token
    steps, where the largest position overall is the largest last one: the If condition's maximum serves."""
    if "gqa_inplace_lengths" not in g.memo:
        i64, i32 = np.int64, np.int32
        last = g.op("Slice", [pos, g.constant("start", [-1], i64), g.constant("i64max", [primitives.I64_MAX], i64),
                              g.constant("axis1", [1], i64)], like=like, dtype=i64)  # fmt: skip
        flat = g.op("Reshape", [last, g.constant("shape_flat", [-1], i64)], like=like, dtype=i64)
        total = g.op("Add", [_top_position(g, pos, like), g.constant("one", np.array(1, i64))], like=like, dtype=i64)
        g.memo["gqa_inplace_lengths"] = (primitives.cast(g, flat, i32, like), primitives.cast(g, total, i32, like))
    return g.memo["gqa_inplace_lengths"]


def _top_position(g: PassGraph, pos: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """max(position_ids), a scalar: one op for every layer's condition and lengths."""
    if "top_position" not in g.memo:
        g.memo["top_position"] = g.op("ReduceMax", [pos], like=like, dtype=np.int64, keepdims=0, shape=[])
    return g.memo["top_position"]


def _gqa_step(g: PassGraph, pos: gs.Tensor, past: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """`S == 1 and C > max(position)`: a one-token step whose positions index this buffer unwrapped (every
    global buffer; a sliding buffer only when the runtime gave it the full length), as GQA writes them.
    S is read from position_ids, so the condition needs nothing the branches compute. A one-element [1]
    condition (ONNX If takes any single-element tensor): a decode step runs no op it can spare, which is
    what a small model's step time is made of (one `S == 1` for all layers, one `C > max` per buffer size).
    GQA is kept at any length: on the medium model, standard ops for the global layers past 1024 positions
    decoded at 1.03x GQA's time (1500 and 3000 positions, sessions made alternately, ad hoc)."""
    key = ("gqa_step", inplace_ops.length_key(past))
    if key not in g.memo:
        i64 = np.int64
        if "one_token" not in g.memo:
            g.memo["one_token"] = g.op(
                "Equal", [primitives.dim(g, pos, 1, like), g.constant("one", [1], i64)], like=like, dtype=np.bool_
            )
        fits = g.op("Greater", [primitives.dim(g, past, 2, like), _top_position(g, pos, like)], like=like,
                    dtype=np.bool_, shape=[1])  # fmt: skip
        g.memo[key] = g.op("And", [g.memo["one_token"], fits], like=like, dtype=np.bool_, shape=[1])
    return g.memo[key]


@dataclasses.dataclass(frozen=True)
class Masks:
    """What the standard-op branch of every layer in a group reads, built once behind `_gated_masks`' If."""

    fresh: gs.Tensor  # a first prompt's bias
    circular: gs.Tensor  # a continuing step's bias over the buffer slots it reads
    slots: tuple[gs.Tensor, gs.Tensor]  # those slots, [lo, hi) (inplace_ops.read_slots)


def _gated_masks(g: PassGraph, gqa: gs.Tensor, pos: gs.Tensor, past: gs.Tensor, window: int, like: gs.Node) -> Masks:
    """The standard-op branch's masks (a first prompt's, and the circular buffer's, with the slots it covers)
    for every layer of this window and buffer length, built once behind `If(gqa)`: then: placeholders,
    else: the masks. Per site, they would be built once per layer by each step that takes the standard ops
    (a prompt, a ring's decode); in the main graph, by every GQA step too; behind this If a GQA step pays
    one If call."""
    key = ("gated_masks", window, inplace_ops.length_key(past))
    if key not in g.memo:
        slots = inplace_ops.read_slots(g, pos, past, window, like)
        built = [
            inplace_ops.bias(g, "fresh", pos, past, window, like, shared=False),
            inplace_ops.bias(g, "circular", pos, past, window, like, shared=False, slots=slots),
            *slots,
        ]
        names, dtypes = ("fresh_bias", "circular_bias", "read_lo", "read_hi"), (np.float32,) * 2 + (np.int64,) * 2
        empty = {np.float32: g.constant("no_bias", np.zeros((1, 1, 1, 1), np.float32)),
                 np.int64: g.constant("no_slot", np.zeros([1], np.int64))}  # fmt: skip
        placeholders = [g.op("Identity", [empty[t]], like=like, dtype=t) for t in dtypes]
        outs = [g.variable(f"{like.name}/{n}", t) for n, t in zip(names, dtypes, strict=True)]
        g.memo.setdefault(MASK_IFS, []).append(branches.make_if(g, gqa, placeholders, built, outs, like=like))
        g.memo[key] = Masks(outs[0], outs[1], (outs[2], outs[3]))
    return g.memo[key]


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
    branches.move_into_branches(g, g.memo.get(MASK_IFS, []))  # each shared by a group of layers' Ifs
    branches.move_into_branches(g, g.memo.get(INNER_IFS, []))  # nested in the outer Ifs' prompt branches
    branches.move_into_branches(g, g.memo.get(IFS, []))


def _packed(
    g: PassGraph,
    t: gs.Tensor,
    heads: int,
    d: int,
    max_positions: int | None,
    like: gs.Node,
    positions: gs.Tensor | None = None,
) -> gs.Tensor:
    """`t` [B, N, S, Dh] as [B, S, N*Dh]: the projection itself when possible (RoPE re-done by RotaryEmbedding,
    at `positions` if given, else the graph's own position_ids)."""
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
                [r.linear, r.position_ids if positions is None else positions, cos_c, sin_c],
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
    name="lower_attention_ort",
    anchors=(SPEC.name, INPLACE.name),
    match=match,
    rewrite=rewrite,
    finish=finish,
    doc=__doc__ or "",
)
# the same lowering for onnxruntime's CUDA provider (see "CUDA form" above); the pass report names it apart
PASS_CUDA = dataclasses.replace(PASS, name="lower_attention_ort_cuda", rewrite=rewrite_cuda)
run = PASS.__call__

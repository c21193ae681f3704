"""Standard-ONNX decompositions of `SlidingWindowAttentionInplace` (the in-place KV cache, export/kv_cache.py).

Two forms, one per runtime's cache-write primitive:

    circular (onnxruntime; what the export itself computes):
        present = TensorScatter(past, new[:, :, S-n:], (last - n + 1) mod C; mode=circular)   n = min(S, C)
        keys    = global: present            sliding: present's pre-step slots, then `new`
                  (only the slots the step can see while the buffer is unwrapped: `read_slots`)
        mask    = from the position each slot holds: last - ((last - s) mod C), valid if >= 0

    linear (TensorRT: its KV-cache update layer is linear only and needs a static cache length, so
    every layer's buffer holds the whole sequence, slot = position, nothing wraps):
        present = TensorScatter(past, rotate(new, padding), max(first, 0))   padding moved after the
                  real tokens, into slots no query has reached yet
        keys    = present                    mask = slot <= query (and > query - window)

GQA groups the query heads of a KV head (no repeated cache); scores, soft-cap and softmax run in fp32.
With `shared=True` masks are built once per group of layers that share a window and a cache length
(`PassGraph.memo`); `shared=False` gives each site its own (so it can move into an If branch).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graph_passes import primitives
from graph_passes.graph import PassGraph
from graph_passes.match import dtype_of

Form = Literal["circular", "linear", "fresh"]  # fresh: this step's own keys only (a first prompt)
I64 = np.int64
F32 = np.float32


def _i64(g: PassGraph, hint: str, value: Any) -> gs.Constant:
    return g.constant(hint, np.array(value, I64))


def _invalid(g: PassGraph) -> gs.Constant:
    """The position the model gives a slot or key that holds nothing (export/kv_cache.py's INVALID), imported
    here: that module registers a torch op, and what only reads or rewrites a graph must not load torch."""
    from export.kv_cache import INVALID

    return _i64(g, "invalid", INVALID)


def _column(g: PassGraph, pos: gs.Tensor, index: int, like: gs.Node, shared: bool = True) -> gs.Tensor:
    """position_ids[:, index] as [B, 1] (index 0 or -1)."""
    key = ("inplace.column", index)
    if shared and key in g.memo:
        return g.memo[key]
    start, end = (0, 1) if index == 0 else (-1, primitives.I64_MAX)
    bounds = [pos, _i64(g, "start", [start]), _i64(g, "end", [end]), _i64(g, "axis1", [1])]
    column = g.op("Slice", bounds, like=like, dtype=I64)
    if shared:
        g.memo[key] = column
    return column


def _flat(g: PassGraph, column: gs.Tensor, like: gs.Node) -> gs.Tensor:
    return g.op("Reshape", [column, _i64(g, "shape_flat", [-1])], like=like, dtype=I64)


def write(
    g: PassGraph,
    form: Form,
    past: gs.Tensor,
    new: gs.Tensor,
    pos: gs.Tensor,
    out: gs.Variable,
    like: gs.Node,
    shared: bool = True,
) -> None:
    """`out` = `past` with `new [B, KV, S, Dh]` written by the contract's rule, as one TensorScatter."""
    if form == "circular":
        s = primitives.dim(g, new, 2, like)
        c = primitives.dim(g, past, 2, like)
        n = g.op("Min", [s, c], like=like, dtype=I64, shape=[1])
        start = g.op("Sub", [s, n], like=like, dtype=I64)
        end, axis2 = _i64(g, "end", [primitives.I64_MAX]), _i64(g, "axis2", [2])
        update = g.op("Slice", [new, start, end, axis2], like=like, dtype=new.dtype)  # the last n tokens
        last = _column(g, pos, -1, like, shared)
        first = g.op("Add", [g.op("Sub", [last, n], like=like, dtype=I64), _i64(g, "one", 1)], like=like, dtype=I64)
        index = _flat(g, g.op("Mod", [first, c], like=like, dtype=I64, fmod=0), like)
        g.node("TensorScatter", [past, update, index], [out], like=like, axis=2, mode="circular")
        return
    p0 = _flat(g, _column(g, pos, 0, like, shared), like)  # [B]
    zero = _i64(g, "zero", 0)
    padding = g.op("Max", [g.op("Neg", [p0], like=like, dtype=I64), zero], like=like, dtype=I64)
    s = primitives.dim(g, new, 2, like)
    j = g.op("Range", [zero, primitives.scalar_of(g, s, like), _i64(g, "one", 1)], like=like, dtype=I64)
    row = g.op("Unsqueeze", [j, _i64(g, "axis0", [0])], like=like, dtype=I64)  # [1, S]
    col = g.op("Unsqueeze", [padding, _i64(g, "axis1", [1])], like=like, dtype=I64)  # [B, 1]
    shifted = g.op("Add", [row, col], like=like, dtype=I64)
    source = g.op("Mod", [shifted, s], like=like, dtype=I64, fmod=0)  # [B, S]: padding after the real tokens
    index = g.op("Unsqueeze", [source, _i64(g, "axes13", [1, 3])], like=like, dtype=I64)  # [B, 1, S, 1]
    index = g.op("Expand", [index, g.op("Shape", [new], like=like, dtype=I64)], like=like, dtype=I64)
    rotated = g.op("GatherElements", [new, index], like=like, dtype=new.dtype, axis=2)
    g.node("TensorScatter", [past, rotated, g.op("Max", [p0, zero], like=like, dtype=I64)], [out], like=like, axis=2)


def read_slots(
    g: PassGraph, pos: gs.Tensor, past: gs.Tensor, window: int, like: gs.Node
) -> tuple[gs.Tensor, gs.Tensor]:
    """[lo, hi) as two [1] tensors: the buffer slots a step that continues a sequence (chunked prefill) reads
    in the circular form, so it costs the keys it can see rather than the whole buffer. A buffer holds
    positions unwrapped (slot = position) while max(position) < C: a global one is read up to the last
    position written, a sliding one over the window before each row's first query, [min first - window + 1,
    max first); a ring that wrapped is read whole, as before. Slots in the range that a row may not see are
    masked as ever. Built per use (no memo), so it moves into the If branch that reads it."""
    zero, one = _i64(g, "zero1", [0]), _i64(g, "one1", [1])
    c = primitives.dim(g, past, 2, like)
    top = g.op("ReduceMax", [pos], like=like, dtype=I64, keepdims=0)  # a scalar
    if not window:
        return zero, g.op("Min", [c, g.op("Add", [top, one], like=like, dtype=I64)], like=like, dtype=I64, shape=[1])
    first = _column(g, pos, 0, like, shared=False)  # [B, 1]
    low = g.op("ReduceMin", [first], like=like, dtype=I64, keepdims=0)
    high = g.op("ReduceMax", [first], like=like, dtype=I64, keepdims=0)
    lo = g.op("Max", [zero, g.op("Sub", [low, _i64(g, "window_1", window - 1)], like=like, dtype=I64)], like=like,
              dtype=I64, shape=[1])  # fmt: skip
    hi = g.op("Max", [g.op("Add", [lo, one], like=like, dtype=I64), high], like=like, dtype=I64, shape=[1])
    unwrapped = g.op("Less", [top, c], like=like, dtype=np.bool_, shape=[1])
    return (g.op("Where", [unwrapped, lo, zero], like=like, dtype=I64, shape=[1]),
            g.op("Where", [unwrapped, hi, c], like=like, dtype=I64, shape=[1]))  # fmt: skip


def slots_of(g: PassGraph, buffer: gs.Tensor, slots: tuple[gs.Tensor, gs.Tensor], like: gs.Node) -> gs.Tensor:
    """buffer[:, :, lo:hi]."""
    return g.op("Slice", [buffer, slots[0], slots[1], _i64(g, "axis2", [2])], like=like, dtype=buffer.dtype)


def length_key(past: gs.Tensor) -> str | int:
    """What identifies a cache buffer's length in `PassGraph.memo` keys: its dim (symbolic or static),
    else its name. Layers whose buffers share one get one mask, one condition."""
    length = past.shape[2] if past.shape is not None and len(past.shape) == 4 else None
    return length if isinstance(length, (str, int)) else past.name


def bias(
    g: PassGraph,
    form: Form,
    pos: gs.Tensor,
    past: gs.Tensor,
    window: int,
    like: gs.Node,
    shared: bool = True,
    slots: tuple[gs.Tensor, gs.Tensor] | None = None,
) -> gs.Tensor:
    """Additive fp32 bias [B, 1, S, K] over the keys `attention` reads; one per (form, window, cache length).
    The circular form masks the slots `read_slots` gives (`slots`, when the caller already built them)."""
    key = ("inplace.bias", form, window, length_key(past))
    if shared and key in g.memo:
        return g.memo[key]
    zero, one = _i64(g, "zero", 0), _i64(g, "one", 1)
    if form == "fresh":  # no row holds anything older than this step: its own keys are all there is
        keys = g.op("Where", [g.op("GreaterOrEqual", [pos, zero], like=like, dtype=np.bool_), pos,
                              _invalid(g)], like=like, dtype=I64)  # fmt: skip
        return _position_mask(g, pos, keys, window, like, key if shared else None)
    c = primitives.dim(g, past, 2, like)
    if form == "circular" and slots is None:
        slots = read_slots(g, pos, past, window, like)
    first, end = (zero, c) if slots is None else (primitives.scalar_of(g, slots[0], like), slots[1])
    slots = g.op("Range", [first, primitives.scalar_of(g, end, like), one], like=like, dtype=I64)  # what is read
    if form == "linear":
        keys = g.op("Unsqueeze", [slots, _i64(g, "axis0", [0])], like=like, dtype=I64)  # [1, C]: slot = position
    else:
        last = _column(g, pos, -1, like, shared)  # [B, 1]
        back = g.op("Mod", [g.op("Sub", [last, slots], like=like, dtype=I64), c], like=like, dtype=I64, fmod=0)
        held = g.op("Sub", [last, back], like=like, dtype=I64)  # [B, slots]: the position each slot holds
        valid = g.op("GreaterOrEqual", [held, zero], like=like, dtype=np.bool_)
        if window:
            older = g.op("Less", [held, _column(g, pos, 0, like, shared)], like=like, dtype=np.bool_)
            valid = g.op("And", [valid, older], like=like, dtype=np.bool_)
        invalid = _invalid(g)
        keys = g.op("Where", [valid, held, invalid], like=like, dtype=I64)
        if window:  # then this step's own keys; padding (negative) is invalid
            real = g.op("GreaterOrEqual", [pos, zero], like=like, dtype=np.bool_)
            own = g.op("Where", [real, pos, invalid], like=like, dtype=I64)
            keys = g.op("Concat", [keys, own], like=like, dtype=I64, axis=1)  # [B, C + S]
    return _position_mask(g, pos, keys, window, like, key if shared else None)


def _position_mask(
    g: PassGraph, pos: gs.Tensor, keys: gs.Tensor, window: int, like: gs.Node, memo_key: Any
) -> gs.Tensor:
    """Where(key <= query [and key > query - window], 0, min) [B, 1, S, K] from key positions [B|1, K]."""
    k = g.op("Unsqueeze", [keys, _i64(g, "axes12", [1, 2])], like=like, dtype=I64)  # [B|1, 1, 1, K]
    q = g.op("Unsqueeze", [pos, _i64(g, "axes13", [1, 3])], like=like, dtype=I64)  # [B, 1, S, 1]
    allowed = g.op("LessOrEqual", [k, q], like=like, dtype=np.bool_)
    if window:
        low = g.op("Sub", [q, _i64(g, "window", window)], like=like, dtype=I64)
        allowed = g.op(
            "And", [allowed, g.op("Greater", [k, low], like=like, dtype=np.bool_)], like=like, dtype=np.bool_
        )
    lo = g.constant("f32min", np.array(np.finfo(F32).min, F32))
    result = g.op("Where", [allowed, g.constant("f32zero", np.array(0.0, F32)), lo], like=like, dtype=F32)
    if memo_key is not None:
        g.memo[memo_key] = result
    return result


def attention(
    g: PassGraph,
    query: gs.Tensor,
    keys: list[gs.Tensor],
    values: list[gs.Tensor],
    bias_: gs.Tensor,
    attrs: dict[str, Any],
    out: gs.Variable,
    like: gs.Node,
) -> None:
    """`out [B, H, S, Dh]` = softmax(softcap(q kᵀ * scale) + bias) v over key blocks side by side."""
    h, kv, d = int(attrs["num_heads"]), int(attrs["kv_heads"]), int(attrs["head_dim"])

    def shape(*dims: int) -> gs.Constant:
        return g.constant("shape", np.array(dims, I64))

    qdt = dtype_of(query) or F32
    qg = g.op("Reshape", [query, shape(0, kv, -1, d)], like=like, dtype=qdt)  # [B, KV, R*S, Dh]
    blocks = []
    for k in keys:
        kt = g.op("Transpose", [k], like=like, dtype=k.dtype, perm=[0, 1, 3, 2])
        blocks.append(g.op("MatMul", [qg, kt], like=like, dtype=qdt))
    scores = blocks[0] if len(blocks) == 1 else g.op("Concat", blocks, like=like, dtype=qdt, axis=-1)
    scores = g.op("Reshape", [scores, shape(0, h, -1, 0)], like=like, dtype=qdt)
    scores = primitives.scaled_scores(g, scores, float(attrs["scale"]), float(attrs["softcap"] or 0), like)
    probs = g.op("Softmax", [g.op("Add", [scores, bias_], like=like, dtype=F32)], like=like, dtype=F32, axis=-1)
    vdt = dtype_of(values[0]) or F32
    probs = g.op("Reshape", [primitives.cast(g, probs, vdt, like), shape(0, kv, -1, 0)], like=like, dtype=vdt)
    if len(values) == 1:
        total = g.op("MatMul", [probs, values[0]], like=like, dtype=vdt)
    else:
        sizes = g.op("Concat", [primitives.dim(g, v, 2, like) for v in values], like=like, dtype=I64, axis=0)
        parts = _split(g, probs, sizes, len(values), like, vdt)
        products = [g.op("MatMul", [p, v], like=like, dtype=vdt) for p, v in zip(parts, values, strict=True)]
        total = products[0]
        for p in products[1:]:
            total = g.op("Add", [total, p], like=like, dtype=vdt)
    g.node("Reshape", [total, shape(0, h, -1, d)], [out], like=like)


def _split(g: PassGraph, x: gs.Tensor, sizes: gs.Tensor, n: int, like: gs.Node, dtype: Any) -> list[gs.Variable]:
    outs = [g.variable(f"{like.name}/probs_{i}", dtype) for i in range(n)]
    g.node("Split", [x, sizes], outs, like=like, axis=-1)
    return outs

"""Standard-ONNX decompositions of the fused ops, written the way the PyTorch model computes them.

The `trt-native` target expands every fused node back into these (stock TensorRT recognises and fuses
them itself), and the `trt` target expands the one standalone RMSNorm. Each builder mirrors a function
of export/model.py (`rms_normalize`, `softcap`, `attention_bias`, `attention_core`), so an expanded
graph computes what the export computed, up to float rounding order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from export import io_contract as io
from graph_passes.graph import PassGraph
from graph_passes.match import dtype_of

F32 = np.float32
I64_MAX = np.iinfo(np.int64).max


def cast(g: PassGraph, x: gs.Tensor, dtype: Any, like: gs.Node) -> gs.Tensor:
    """`x` as `dtype` (no node if it already is)."""
    dtype = np.dtype(dtype)
    if dtype_of(x) == dtype:
        return x
    import onnx

    return g.op("Cast", [x], like=like, dtype=dtype, shape=x.shape, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))


def reduce_last_mean(g: PassGraph, x: gs.Tensor, like: gs.Node) -> gs.Tensor:
    if g.graph.opset >= 18:
        return g.op("ReduceMean", [x, g.constant("axes_last", [-1], np.int64)], like=like, dtype=x.dtype, keepdims=1)
    return g.op("ReduceMean", [x], like=like, dtype=x.dtype, axes=[-1], keepdims=1)


def rmsnorm(
    g: PassGraph, x: gs.Tensor, scale: gs.Tensor, eps: float, like: gs.Node, out: gs.Variable | None = None
) -> gs.Tensor:
    """x * 1/sqrt(mean(x², -1) + eps) * scale, in fp32 (x is cast if it is not), exactly as dynamo exports it."""
    x = cast(g, x, F32, like)
    sq = g.op("Pow", [x, g.constant("two", np.array(2.0, F32))], like=like, dtype=F32)
    mean = reduce_last_mean(g, sq, like)
    var = g.op("Add", [mean, g.constant("eps", np.array(eps, F32))], like=like, dtype=F32)
    inv = g.op("Reciprocal", [g.op("Sqrt", [var], like=like, dtype=F32)], like=like, dtype=F32)
    normed = g.op("Mul", [x, inv], like=like, dtype=F32)
    if out is None:
        return g.op("Mul", [normed, scale], like=like, dtype=F32, shape=x.shape)
    g.node("Mul", [normed, scale], [out], like=like)
    return out


def softcap(g: PassGraph, x: gs.Tensor, cap: float, like: gs.Node) -> gs.Tensor:
    """cap * tanh(x / cap) in x's dtype (callers cast to fp32 first, as the model does)."""
    c = g.constant("cap", np.array(cap, dtype=dtype_of(x) or F32))
    t = g.op("Tanh", [g.op("Div", [x, c], like=like, dtype=x.dtype)], like=like, dtype=x.dtype)
    return g.op("Mul", [t, c], like=like, dtype=x.dtype, shape=x.shape)


def scaled_scores(g: PassGraph, scores: gs.Tensor, scale: float, cap: float | None, like: gs.Node) -> gs.Tensor:
    """Attention scores in fp32, scaled and soft-capped: `cap * tanh(s * (scale / cap))`, or `s * scale`.

    One Mul carries both the scale and the cap's divisor (the model's `s * scale / cap` in one rounding):
    onnxruntime folds it into the score MatMul's alpha, where a separate Div is one more pass over the
    [B, H, S, T] scores per layer (~0.1 ms of a 256-token prompt's 1.7 ms attention, medium model)."""
    scores = cast(g, scores, F32, like)
    factor = scale / cap if cap else scale
    scores = g.op("Mul", [scores, g.constant("scale", np.array(factor, F32))], like=like, dtype=F32)
    if not cap:
        return scores
    t = g.op("Tanh", [scores], like=like, dtype=F32)
    return g.op("Mul", [t, g.constant("cap", np.array(cap, F32))], like=like, dtype=F32, shape=scores.shape)


def dim(g: PassGraph, x: gs.Tensor, axis: int, like: gs.Node) -> gs.Tensor:
    """x.shape[axis] as an int64 [1] tensor."""
    return g.op("Shape", [x], like=like, dtype=np.int64, shape=[1], start=axis, end=axis + 1)


def scalar_of(g: PassGraph, t: gs.Tensor, like: gs.Node) -> gs.Tensor:
    return g.op("Squeeze", [t, g.constant("axis0", [0], np.int64)], like=like, dtype=np.int64, shape=[])


def last_columns(g: PassGraph, mask: gs.Tensor, total: gs.Tensor, like: gs.Node) -> gs.Tensor:
    """attention_mask[:, -total:] (each layer masks by its own cache length; see io_contract)."""
    width = dim(g, mask, 1, like)
    start = g.op("Sub", [width, total], like=like, dtype=np.int64, shape=[1])
    ends = g.constant("i64max", [I64_MAX], np.int64)
    return g.op("Slice", [mask, start, ends, g.constant("axis1", [1], np.int64)], like=like, dtype=mask.dtype)


def attention_bias(
    g: PassGraph, mask: gs.Tensor, query: gs.Tensor, past_key: gs.Tensor, window: int, like: gs.Node
) -> gs.Tensor:
    """Additive fp32 bias [B, 1, S, T]: 0 where allowed, fp32 min where masked (export.model.attention_bias)."""
    s = dim(g, query, 2, like)
    p = dim(g, past_key, 2, like)
    t = g.op("Add", [p, s], like=like, dtype=np.int64, shape=[1])
    zero, one = g.constant("zero", np.array(0, np.int64)), g.constant("one", np.array(1, np.int64))
    q_idx = g.op("Range", [zero, scalar_of(g, s, like), one], like=like, dtype=np.int64)
    q_idx = g.op("Add", [q_idx, p], like=like, dtype=np.int64)
    q_col = g.op("Unsqueeze", [q_idx, g.constant("axis1", [1], np.int64)], like=like, dtype=np.int64)  # [S, 1]
    k_idx = g.op("Range", [zero, scalar_of(g, t, like), one], like=like, dtype=np.int64)
    k_row = g.op("Unsqueeze", [k_idx, g.constant("axis0", [0], np.int64)], like=like, dtype=np.int64)  # [1, T]
    allowed = g.op("LessOrEqual", [k_row, q_col], like=like, dtype=np.bool_)
    if window > 0:
        low = g.op("Sub", [q_col, g.constant("window", np.array(window, np.int64))], like=like, dtype=np.int64)
        allowed = g.op(
            "And", [allowed, g.op("Greater", [k_row, low], like=like, dtype=np.bool_)], like=like, dtype=np.bool_
        )
    pad = cast(g, last_columns(g, mask, t, like), np.bool_, like)  # [B, T]
    pad = g.op("Unsqueeze", [pad, g.constant("axes12", [1, 2], np.int64)], like=like, dtype=np.bool_)  # [B,1,1,T]
    allowed = g.op("Unsqueeze", [allowed, g.constant("axes01", [0, 1], np.int64)], like=like, dtype=np.bool_)
    allowed = g.op("And", [allowed, pad], like=like, dtype=np.bool_)
    lo = g.constant("f32min", np.array(np.finfo(F32).min, F32))
    return g.op("Where", [allowed, g.constant("f32zero", np.array(0.0, F32)), lo], like=like, dtype=F32)


def attention_mask_input(g: PassGraph) -> gs.Tensor:
    mask = g.input(io.ATTENTION_MASK)
    if mask is None:
        raise ValueError(f"graph has no {io.ATTENTION_MASK!r} input")
    return mask

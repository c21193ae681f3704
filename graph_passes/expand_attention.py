"""expand_attention: `SlidingWindowAttention` -> standard ONNX ops TensorRT fuses itself (`trt-native`).

    present_k = Concat(past_key, key, 2)             present_v = Concat(past_value, value, 2)
    qg     = Reshape(query, [B, KV, R*S, Dh])                   # R = H / KV query heads per KV head
    scores = Reshape(qg @ present_kᵀ, [B, H, S, T]) [Cast f32] * scale
    scores = c * tanh(scores / c)                               # if softcap (one Mul: scale / c)
    probs  = Softmax(scores + bias(attention_mask, window), -1) [Cast]
    out    = Reshape(Reshape(probs, [B, KV, R*S, T]) @ present_v, [B, H, S, Dh])

Unlike the export, GQA is a reshape of the queries, not an Expand of the cache: the KV cache is read
once per KV head, not once per query head (R times less memory traffic in decode). The mask is built
once per (window, cache-length) group of layers, as the model builds one bias per layer type.

`SlidingWindowAttentionInplace` (the in-place KV cache) becomes graph_passes/inplace_ops.py's linear
form: TensorScatter(mode=linear), which TensorRT parses into its KV-cache update layer (in place, a
static cache length, linear writes only), then the same grouped attention over the whole buffer, masked
by slot position. Linear writes cannot wrap, so a trt-native graph needs full-length sliding buffers
(its manifest says so: kv_cache_sliding = "full").
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import inplace_ops, primitives
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject
from trt_plugins.attention import SPEC
from trt_plugins.attention_inplace import SPEC as INPLACE


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.domain != SPEC.domain:
        raise Reject(f"{node.name} is not in domain {SPEC.domain}")
    return Site(None, [node], node)


def rewrite_inplace(g: PassGraph, node: gs.Node) -> None:
    a = INPLACE.parse(node.attrs)
    query, key, value, past_key, past_value, pos = node.inputs
    out, present_k, present_v = node.outputs
    g.detach(node)
    inplace_ops.write(g, "linear", past_key, key, pos, present_k, node)
    inplace_ops.write(g, "linear", past_value, value, pos, present_v, node)
    bias = inplace_ops.bias(g, "linear", pos, past_key, int(a["window"]), node)
    inplace_ops.attention(g, query, [present_k], [present_v], bias, a, out, node)


def group_key(past_key: gs.Tensor, window: int) -> tuple:
    """Layers whose caches share a symbolic length (and window) share one mask subgraph."""
    length = past_key.shape[2] if past_key.shape is not None and len(past_key.shape) == 4 else None
    return (window, length if isinstance(length, str) else past_key.name)


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    if node.op == INPLACE.name:
        rewrite_inplace(g, node)
        return
    a = SPEC.parse(node.attrs)
    h, kv, d = int(a["num_heads"]), int(a["kv_heads"]), int(a["head_dim"])
    query, key, value, past_key, past_value, mask = node.inputs
    out, present_k, present_v = node.outputs
    g.detach(node)
    g.node("Concat", [past_key, key], [present_k], like=node, axis=2)
    g.node("Concat", [past_value, value], [present_v], like=node, axis=2)

    memo_key = ("expand_attention.bias", group_key(past_key, int(a["window"])))
    if memo_key not in g.memo:
        g.memo[memo_key] = primitives.attention_bias(g, mask, query, past_key, int(a["window"]), node)
    bias = g.memo[memo_key]

    def shape(*dims: int) -> gs.Constant:
        return g.constant("shape", np.array(dims, np.int64))

    qdt = primitives.dtype_of(query) or np.float32
    qg = g.op("Reshape", [query, shape(0, kv, -1, d)], like=node, dtype=qdt)
    k_t = g.op("Transpose", [present_k], like=node, dtype=present_k.dtype, perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [qg, k_t], like=node, dtype=qdt)
    scores = g.op("Reshape", [scores, shape(0, h, -1, 0)], like=node, dtype=qdt)
    scores = primitives.scaled_scores(g, scores, float(a["scale"]), float(a["softcap"] or 0), node)
    scores = g.op("Add", [scores, bias], like=node, dtype=np.float32)
    probs = g.op("Softmax", [scores], like=node, dtype=np.float32, axis=-1)
    probs = primitives.cast(g, probs, primitives.dtype_of(present_v) or np.float32, node)
    probs = g.op("Reshape", [probs, shape(0, kv, -1, 0)], like=node, dtype=probs.dtype)
    o = g.op("MatMul", [probs, present_v], like=node, dtype=present_v.dtype)
    g.node("Reshape", [o, shape(0, h, -1, d)], [out], like=node)


PASS = Pass(name="expand_attention", anchors=(SPEC.name, INPLACE.name), match=match, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

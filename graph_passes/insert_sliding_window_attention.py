"""insert_sliding_window_attention: Gemma 2's attention core -> one `SlidingWindowAttention` node.

    past_key ─┐
    key ──── Concat(2) ─> present_key ─ [Unsqueeze(2) ─ Expand ─ Reshape] ─ Transpose(0,1,3,2) ─┐
    query ─────────────────────────────────────────────────────────────────────────────────── MatMul ─┐
      ┌──────────────────────────────────────────────────────────────────────────────────────────────┘
      └─ [Cast f32] ─ Mul(scale) ─ [Div(c) ─ Tanh ─ Mul(c) | SoftCap(c)] ─ Add(bias) ─ Softmax(-1) ─ [Cast] ─┐
    past_value ─┐                                                                                          │
    value ──── Concat(2) ─> present_value ─ [Unsqueeze(2) ─ Expand ─ Reshape] ─────────────────────── MatMul ─> out
    bias = Where(causal & window & attention_mask[:, -T:], 0, min)      (built from the graph input)

    ─>  SlidingWindowAttention(query, key, value, past_key, past_value, attention_mask)
            -> (out, present_key, present_value)   attrs: num_heads, kv_heads, head_dim, scale, softcap, window

The in-place KV cache contract's core (TensorScatter cache writes, grouped-query score blocks, masks
from position_ids) becomes `SlidingWindowAttentionInplace(query, key, value, past_key, past_value,
position_ids)` with the same attributes; its pattern is drawn in graph_passes/match_inplace_attention.py.

The bracketed GQA head expansion is absent when kv_heads == num_heads. The node takes the raw
`attention_mask` input; the per-layer-type bias subgraph dies with the sites. The window is read from
the bias subgraph (`Greater(k_idx, q_idx - w)`), never from a layer index, and must agree with the
config's layer type: a layer whose mask and config disagree is rejected, not silently fused with the
wrong window. Scale and soft-cap come from the graph's constants and are checked against the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import onnx_graphsurgeon as gs

from export import io_contract as io
from export.config import Gemma2Config
from graph_passes import labels, match_inplace_attention
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import (
    Reject,
    check_private,
    ints,
    last_axis,
    maybe_producer,
    only_consumer,
    other_input,
    producer,
    rank,
    scalar,
)
from trt_plugins.attention import SPEC
from trt_plugins.attention_inplace import SPEC as INPLACE
from trt_plugins.softcap import SPEC as SOFTCAP
from trt_plugins.spec import PluginSpec

_SCORE_OPS = ("Mul", "Div", "Tanh", "Cast", SOFTCAP.name)
_MASK_SEARCH_LIMIT = 200  # nodes visited upward from the bias; the export's mask subgraph has ~25


@dataclasses.dataclass(frozen=True)
class Attention:
    inputs: list[gs.Tensor]  # query, key, value, past_key, past_value, attention_mask | position_ids
    outputs: list[gs.Tensor]  # out, present_key, present_value
    attrs: dict
    detach: list[gs.Node]
    spec: PluginSpec = SPEC


def match(g: PassGraph, softmax: gs.Node, config: Gemma2Config | None) -> Site:
    if not last_axis(softmax, rank(softmax.inputs[0])):
        raise Reject(f"{softmax.name} is not over the last axis")
    add = producer(softmax.inputs[0], "Add")
    capped, bias = _split_scores_bias(add)
    cap, scaled, cap_nodes = _softcap(capped)
    scale, qk, scale_nodes = _scale(scaled)
    if maybe_producer(qk, "Reshape") is not None:  # the in-place contract's grouped score blocks
        return _match_inplace(g, softmax, add, bias, qk, [*cap_nodes, *scale_nodes], scale, cap, config)
    mm = producer(qk, "MatMul")
    query, k_t = mm.inputs
    tr = producer(k_t, "Transpose")
    if list(tr.attrs.get("perm", [])) != [0, 1, 3, 2]:
        raise Reject(f"{tr.name} is not a key transpose (perm {tr.attrs.get('perm')})")
    present_k, k_rep = _unrepeat(tr.inputs[0])
    cat_k = _cache_concat(present_k, "key")

    user = only_consumer(softmax.outputs[0], "Cast", "MatMul")
    probs_cast = user if user.op == "Cast" else None
    mm2 = only_consumer(probs_cast.outputs[0], "MatMul") if probs_cast is not None else user
    if mm2.inputs[0] is not (probs_cast or softmax).outputs[0]:
        raise Reject(f"{mm2.name} does not take the probabilities as its left operand")
    present_v, v_rep = _unrepeat(mm2.inputs[1])
    cat_v = _cache_concat(present_v, "value")

    heads, kv_heads, head_dim = _dims(query, present_k, config)
    mask = g.input(io.ATTENTION_MASK)
    if mask is None:
        raise Reject(f"the graph has no {io.ATTENTION_MASK!r} input")
    window = _window(bias, mask)
    layer = labels.cache_layer(present_k, present_v, cat_k.inputs[0], cat_v.inputs[0])
    if layer is None:
        layer = g.layer_of(softmax)
    if config is not None:
        _check_config(config, layer, window, scale, cap)

    interior = [mm, *scale_nodes, *cap_nodes, add, softmax, mm2, tr, *k_rep, *v_rep]
    if probs_cast is not None:
        interior.append(probs_cast)
    check_private(interior, allowed_external=[mm2.outputs[0]])
    attrs = SPEC.attributes(
        num_heads=heads, kv_heads=kv_heads, head_dim=head_dim, scale=scale, softcap=cap, window=window
    )
    data = Attention(
        inputs=[query, cat_k.inputs[1], cat_v.inputs[1], cat_k.inputs[0], cat_v.inputs[0], mask],
        outputs=[mm2.outputs[0], present_k, present_v],
        attrs=attrs,
        detach=[mm2, cat_k, cat_v],
    )
    return Site(None if layer is None else f"layer {layer}", [*interior, cat_k, cat_v], data)


def _match_inplace(
    g: PassGraph,
    softmax: gs.Node,
    add: gs.Node,
    bias: gs.Tensor,
    scores: gs.Tensor,
    chain: list[gs.Node],
    scale: float,
    cap: float,
    config: Gemma2Config | None,
) -> Site:
    inputs, outputs, interior, detach = match_inplace_attention.match(scores, softmax)
    positions = match_inplace_attention.position_input(g.graph)
    query, present_k = inputs[0], outputs[1]
    heads, kv_heads, head_dim = _dims(query, present_k, config)
    window = _window(bias, positions)
    layer = labels.cache_layer(present_k, outputs[2], inputs[3], inputs[4])
    if layer is None:
        layer = g.layer_of(softmax)
    if config is not None:
        _check_config(config, layer, window, scale, cap)
    site_nodes = [*interior, *chain, add, softmax]
    check_private(site_nodes, allowed_external=outputs)
    attrs = INPLACE.attributes(
        num_heads=heads, kv_heads=kv_heads, head_dim=head_dim, scale=scale, softcap=cap, window=window
    )
    data = Attention([*inputs, positions], outputs, attrs, detach, INPLACE)
    return Site(None if layer is None else f"layer {layer}", site_nodes, data)


def _split_scores_bias(add: gs.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """(scores, bias): the scores addend is the one produced by the score chain."""
    sides = [t for t in add.inputs if t.inputs and t.inputs[0].op in _SCORE_OPS]
    if len(sides) != 1:
        raise Reject(f"cannot tell scores from mask in {add.name}")
    return sides[0], other_input(add, sides[0])


def _softcap(t: gs.Tensor) -> tuple[float, gs.Tensor, list[gs.Node]]:
    """(cap, uncapped scores, nodes); cap 0.0 when the scores are not soft-capped."""
    node = t.inputs[0]
    if node.op == SOFTCAP.name:
        return float(node.attrs["cap"]), node.inputs[0], [node]
    if node.op != "Mul" or not any(i.inputs and i.inputs[0].op == "Tanh" for i in node.inputs):
        return 0.0, t, []
    tanh_out = next(i for i in node.inputs if i.inputs and i.inputs[0].op == "Tanh")
    c_out = scalar(other_input(node, tanh_out), "soft-cap multiplier")
    tanh = tanh_out.inputs[0]
    div = producer(tanh.inputs[0], "Div", "Mul")
    c_in = scalar(div.inputs[1], "soft-cap divisor")
    if div.op == "Mul":
        c_in = 1.0 / c_in if c_in else math.inf
    if not math.isclose(c_in, c_out, rel_tol=1e-6):
        raise Reject(f"scores / {c_in:g} are scaled back by {c_out:g}: not a soft-cap")
    return c_out, div.inputs[0], [node, tanh, div]


def _scale(t: gs.Tensor) -> tuple[float, gs.Tensor, list[gs.Node]]:
    node = producer(t, "Mul", "Div")
    raw = node.inputs[0]
    s = scalar(node.inputs[1], "score scale")
    if node.op == "Div":
        s = 1.0 / s
    nodes = [node]
    cast = maybe_producer(raw, "Cast")
    if cast is not None:
        nodes.append(cast)
        raw = cast.inputs[0]
    return s, raw, nodes


def _unrepeat(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """The cache tensor behind GQA's `repeat_kv` (Unsqueeze(2) -> Expand -> Reshape), if any."""
    reshape = maybe_producer(t, "Reshape")
    if reshape is None:
        return t, []
    expand = producer(reshape.inputs[0], "Expand")
    unsqueeze = producer(expand.inputs[0], "Unsqueeze")
    axes = unsqueeze.attrs.get("axes") or ints(unsqueeze.inputs[1], "Unsqueeze axes")
    if list(axes) != [2]:
        raise Reject(f"{unsqueeze.name} does not insert the repeat axis 2")
    return unsqueeze.inputs[0], [reshape, expand, unsqueeze]


def _cache_concat(present: gs.Tensor, kind: str) -> gs.Node:
    cat = producer(present, "Concat")
    axis = int(cat.attrs.get("axis", 0))
    if len(cat.inputs) != 2 or axis not in (2, -2):
        raise Reject(f"{cat.name} is not the {kind} cache append Concat(past, new, axis=2)")
    return cat


def _dims(query: gs.Tensor, present_k: gs.Tensor, config: Gemma2Config | None) -> tuple[int, int, int]:
    def static(t: gs.Tensor, i: int) -> int | None:
        return t.shape[i] if t.shape is not None and len(t.shape) == 4 and isinstance(t.shape[i], int) else None

    h, kv, d = static(query, 1), static(present_k, 1), static(query, 3)
    if config is not None:
        want = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        for got, exp, what in zip((h, kv, d), want, ("query heads", "kv heads", "head_dim"), strict=True):
            if got is not None and got != exp:
                raise Reject(f"graph has {got} {what}, config says {exp}")
        return want
    if h is None or kv is None or d is None:
        raise Reject("head counts unknown: no config and no static shapes")
    return h, kv, d


def _window(bias: gs.Tensor, mask: gs.Tensor) -> int:
    """The sliding window of the mask subgraph behind `bias` (0 = global); it must read `mask`
    (attention_mask, or position_ids in the in-place contract)."""
    seen: set[int] = set()
    todo = deque([bias])
    reached_mask, windows = False, set()
    while todo and len(seen) < _MASK_SEARCH_LIMIT:
        t = todo.popleft()
        if t is mask:
            reached_mask = True
        if not t.inputs or id(t.inputs[0]) in seen:
            continue
        node = t.inputs[0]
        seen.add(id(node))
        w = _window_clause(node)
        if w is not None:
            windows.add(w)
        todo.extend(node.inputs)
    if not reached_mask:
        raise Reject(f"the mask {bias.name} does not derive from {mask.name}")
    if len(windows) > 1:
        raise Reject(f"the mask {bias.name} has several window clauses {sorted(windows)}")
    return windows.pop() if windows else 0


def _window_clause(node: gs.Node) -> int | None:
    """w from `Greater(k_idx, Sub(q_idx, w))` (as export.model.sliding_mask writes it)."""
    if node.op != "Greater" or not node.inputs[1].inputs:
        return None
    sub = node.inputs[1].inputs[0]
    if sub.op != "Sub":
        return None
    try:
        w = scalar(sub.inputs[1], "window")
    except Reject:
        return None
    return int(w) if w > 0 and w == int(w) else None


def _check_config(cfg: Gemma2Config, layer: int | None, window: int, scale: float, cap: float) -> None:
    if not math.isclose(scale, cfg.attn_scale, rel_tol=1e-6):
        raise Reject(f"score scale {scale:g} differs from the config's {cfg.attn_scale:g}")
    want_cap = cfg.attn_logit_softcapping or 0.0
    if not math.isclose(cap, want_cap, rel_tol=1e-6):
        raise Reject(f"soft-cap {cap:g} differs from the config's {want_cap:g}")
    if layer is not None:
        if not 0 <= layer < cfg.num_hidden_layers:
            raise Reject(f"layer {layer} is beyond the config's {cfg.num_hidden_layers} layers")
        if window != cfg.windows[layer]:
            kind = cfg.layer_types[layer]
            raise Reject(f"layer {layer}: mask window {window} but the config's {kind} says {cfg.windows[layer]}")


def rewrite(g: PassGraph, site: Site) -> None:
    a: Attention = site.data
    softmax = next(n for n in site.nodes if n.op == "Softmax")
    g.detach(*a.detach)
    g.node(a.spec.name, a.inputs, a.outputs, like=softmax, domain=a.spec.domain, **a.attrs)


def _label(g: PassGraph, softmax: gs.Node) -> str | None:
    """Layer of a rejected candidate: the cache it reads, found by walking to the value Concat."""
    try:
        user = only_consumer(softmax.outputs[0], "Cast", "MatMul")
        mm2 = only_consumer(user.outputs[0], "MatMul") if user.op == "Cast" else user
        present_v, _ = _unrepeat(mm2.inputs[1])
        layer = labels.cache_layer(present_v)
    except Reject:
        layer = None
    if layer is None:
        layer = g.layer_of(softmax)
    return None if layer is None else f"layer {layer}"


PASS = Pass(
    name="insert_sliding_window_attention",
    anchors=("Softmax",),
    match=match,
    rewrite=rewrite,
    expected=labels.expected_layers,
    label=_label,
    doc=__doc__ or "",
)
run = PASS.__call__

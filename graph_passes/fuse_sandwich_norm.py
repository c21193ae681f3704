"""fuse_sandwich_norm: post-norm, residual add and the next pre-norm -> one `SandwichRMSNorm` node.

    x ─ [Cast f32] ─ RMSNorm(post_scale) ─ [Cast] ─┐
                              residual ──────── Add ─┬──────────────────────────────> residual_out
                                                     └─ [Cast f32] ─ RMSNorm(pre_scale) ─ [Cast] ─> normed
    ─>  SandwichRMSNorm(x, residual, post_scale, pre_scale) ─> (residual_out, normed)

Gemma 2 has two per layer: post_attention_norm + residual + pre_feedforward_norm, and
post_feedforward_norm + residual + the next layer's input_norm (the final norm at the last layer).
Casts: with fp16 weights the residual stream is fp32 (see export/model.py); the Cast of the sub-layer
output to fp32 and the Cast of `normed` back to fp16 are absorbed together, so `normed` keeps x's
dtype and `residual_out` the residual's, as the plugin spec says. A final norm reached through
`Slice(h, seq)` (exports with last_logits_only) is fused on sliced inputs: norms are per position.
Runs after fuse_rmsnorm (it matches RMSNorm nodes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import labels
from graph_passes.driver import Pass, Site
from graph_passes.fuse_rmsnorm import OP as RMSNORM
from graph_passes.graph import INTERNAL_DOMAIN, PassGraph
from graph_passes.match import Reject, cast_to, dtype_of, ints, maybe_producer, rank
from trt_plugins.sandwich_rmsnorm import SPEC


@dataclasses.dataclass(frozen=True)
class Sandwich:
    x: gs.Tensor
    residual: gs.Tensor
    post_scale: gs.Tensor
    pre_scale: gs.Tensor
    epsilon: float
    residual_out: gs.Tensor
    normed: gs.Tensor
    detach: list[gs.Node]  # producers of residual_out and normed
    post_norm: gs.Node
    slice: gs.Node | None  # Slice(h) between the add and a final norm


def _is_norm(node: gs.Node | None) -> bool:
    return node is not None and node.op == RMSNORM and node.domain == INTERNAL_DOMAIN


def _norm_behind(t: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """(RMSNorm, cast) if `t` is an RMSNorm output, possibly through one Cast."""
    node = t.inputs[0] if t.inputs else None
    if _is_norm(node):
        return node, None
    if node is not None and node.op == "Cast" and node.inputs[0].inputs and _is_norm(node.inputs[0].inputs[0]):
        return node.inputs[0].inputs[0], node
    return None


def _pre_norm(h: gs.Tensor) -> tuple[gs.Node, list[gs.Node], gs.Node | None]:
    """The RMSNorm reading the new residual `h`: (norm, nodes between, slice)."""
    found: list[tuple[gs.Node, list[gs.Node], gs.Node | None]] = []
    for user in h.outputs:
        if _is_norm(user) and user.inputs[0] is h:
            found.append((user, [], None))
        elif user.op in ("Cast", "Slice") and len(user.outputs[0].outputs) == 1:
            nxt = user.outputs[0].outputs[0]
            between = [user]
            if user.op == "Slice" and nxt.op == "Cast" and len(nxt.outputs[0].outputs) == 1:
                between.append(nxt)
                nxt = nxt.outputs[0].outputs[0]
            if _is_norm(nxt):
                found.append((nxt, between, user if user.op == "Slice" else None))
    if not found:
        raise Reject(f"the new residual {h.name} feeds no RMSNorm (a pre-norm-only or last block)")
    if len(found) > 1:
        raise Reject(f"the new residual {h.name} feeds {len(found)} RMSNorms")
    norm, between, slc = found[0]
    for node in between:
        if node.op == "Cast" and cast_to(node) != np.float32:
            raise Reject(f"{node.name} casts the residual to {cast_to(node)}, not float32")
    if slc is not None:
        if len(h.outputs) != 1:
            raise Reject(f"{h.name} is sliced for the final norm but also used elsewhere")
        axes = ints(slc.inputs[3], "Slice axes") if len(slc.inputs) > 3 else [0]
        r = rank(h)
        if any(a == -1 or (r is not None and a == r - 1) for a in axes):
            raise Reject(f"{slc.name} slices the normalized axis")
    return norm, between, slc


def match(g: PassGraph, add: gs.Node, config: Gemma2Config | None) -> Site:
    if len(add.inputs) != 2:
        raise Reject(f"{add.name} is not binary")
    sides = [(t, _norm_behind(t)) for t in add.inputs]
    post_sides = [(t, found) for t, found in sides if found is not None]
    if not post_sides:
        raise Reject("neither addend comes from an RMSNorm (no post-norm)")
    if len(post_sides) == 2:
        raise Reject("both addends come from RMSNorms")
    post_out, (post, post_cast) = post_sides[0]
    residual = add.inputs[1] if add.inputs[0] is post_out else add.inputs[0]
    if len(post.outputs[0].outputs) != 1 or (post_cast is not None and len(post_cast.outputs[0].outputs) != 1):
        raise Reject(f"the post-norm output {post.outputs[0].name} has other consumers")
    h = add.outputs[0]
    pre, between, slc = _pre_norm(h)
    eps_post, eps_pre = float(post.attrs["epsilon"]), float(pre.attrs["epsilon"])
    if eps_post != eps_pre:
        raise Reject(f"post and pre norms have different epsilon ({eps_post} vs {eps_pre})")

    x, normed, normed_producer = post.inputs[0], pre.outputs[0], pre
    nodes = [post, add, pre, *between] + ([post_cast] if post_cast is not None else [])
    in_cast = maybe_producer(x, "Cast")
    out_users = list(pre.outputs[0].outputs)
    if in_cast is not None and len(x.outputs) == 1 and len(out_users) == 1 and out_users[0].op == "Cast":
        src = in_cast.inputs[0]
        if dtype_of(src) is not None and cast_to(out_users[0]) == dtype_of(src):
            x, normed, normed_producer = src, out_users[0].outputs[0], out_users[0]
            nodes += [in_cast, out_users[0]]
    residual_out = h if slc is None else slc.outputs[0]
    label = labels.sandwich_label(labels.norm_label(g, post))
    data = Sandwich(
        x, residual, post.inputs[1], pre.inputs[1], eps_post, residual_out, normed, [add, normed_producer], post, slc
    )
    return Site(label, nodes, data)


def rewrite(g: PassGraph, site: Site) -> None:
    s: Sandwich = site.data
    x, residual, residual_out = s.x, s.residual, s.residual_out
    if s.slice is not None:  # slice both inputs exactly as h was sliced; the sliced residual is not needed
        x = g.op("Slice", [x, *s.slice.inputs[1:]], like=s.slice, dtype=x.dtype)
        residual = g.op("Slice", [residual, *s.slice.inputs[1:]], like=s.slice, dtype=residual.dtype)
        residual_out = g.variable(f"{s.post_norm.name}/residual_out", residual.dtype)
    g.detach(*s.detach)
    attrs = SPEC.attributes(epsilon=s.epsilon)
    g.node(
        SPEC.name,
        [x, residual, s.post_scale, s.pre_scale],
        [residual_out, s.normed],
        like=s.post_norm,
        domain=SPEC.domain,
        **attrs,
    )


def _label(g: PassGraph, add: gs.Node) -> str | None:
    for t in add.inputs:
        found = _norm_behind(t)
        if found is not None:
            return labels.sandwich_label(labels.norm_label(g, found[0]))
    return None


PASS = Pass(
    name="fuse_sandwich_norm",
    anchors=("Add",),
    match=match,
    rewrite=rewrite,
    expected=labels.expected_sandwiches,
    label=_label,
    doc=__doc__ or "",
)
run = PASS.__call__

"""fuse_rmsnorm: every decomposed RMSNorm the exporters write -> one `RMSNorm(x, scale)` node.

    dynamo (opset 18):                               TorchScript:
    x ─┬─ Pow(2) ─ ReduceMean(-1) ─ Add(eps)          x ─┬─ Pow(2) ─ ReduceMean(-1) ─ Add(eps)
       │            ─ Sqrt ─ Reciprocal ─┐               │            ─ Sqrt ─ Div(1, ·) ─┐
       └──────────────────────────── Mul ─ Mul(scale)    └──────────────────────── Mul ─ Mul(scale)

    also: Mul(x, x) for Pow; Div(x, Sqrt(·)) for Mul(x, Reciprocal(Sqrt(·))); scale on either side;
    opset 23: RMSNormalization(x, scale, axis=-1)  ─>  RMSNorm(x, scale)

`scale` is Gemma's folded `(1 + weight)` (or the unfolded `Add(weight, 1)`: any [D] tensor). The
RMSNorm node (domain g2trt.internal) lives only between passes: a later pass fuses pairs of them into
SandwichRMSNorm, and each target lowers the rest. A `Cast` before the weight (Llama's
`weight * x.to(dtype)`) is not this op and is left alone. Gemma 2 has 4 norms per layer + the final one.
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import labels
from graph_passes.driver import Pass, Site
from graph_passes.graph import INTERNAL_DOMAIN, PassGraph
from graph_passes.match import (
    Reject,
    check_private,
    last_axis,
    only_consumer,
    other_input,
    producer,
    rank,
    scalar,
)

OP = "RMSNorm"  # internal op: y = x / sqrt(mean(x², -1) + epsilon) * scale, math in fp32


@dataclasses.dataclass(frozen=True)
class Norm:
    x: gs.Tensor
    scale: gs.Tensor
    epsilon: float
    out: gs.Tensor
    last: gs.Node  # the node producing `out`


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.op == "RMSNormalization":
        return _match_onnx(g, node)
    mean = node
    sq = producer(mean.inputs[0], "Pow", "Mul")
    x = sq.inputs[0]
    if sq.op == "Pow":
        if scalar(sq.inputs[1], "Pow exponent") != 2.0:
            raise Reject(f"{sq.name} is not a square")
    elif sq.inputs[1] is not x:
        raise Reject(f"{sq.name} is not x * x")
    if not last_axis(mean, rank(x)):
        raise Reject(f"{mean.name} does not reduce the last axis only")
    if int(mean.attrs.get("keepdims", 1)) != 1:
        raise Reject(f"{mean.name} drops the reduced axis (keepdims=0)")
    add = only_consumer(mean.outputs[0], "Add")
    eps = scalar(other_input(add, mean.outputs[0]), "epsilon")
    sqrt = only_consumer(add.outputs[0], "Sqrt")
    inv = only_consumer(sqrt.outputs[0], "Reciprocal", "Div")
    interior = [sq, mean, add, sqrt, inv]
    if inv.op == "Div" and inv.inputs[1] is sqrt.outputs[0] and inv.inputs[0] is x:
        normed = inv  # x / sqrt(...)
    else:
        if inv.op == "Div" and (inv.inputs[1] is not sqrt.outputs[0] or scalar(inv.inputs[0], "numerator") != 1.0):
            raise Reject(f"{inv.name} is neither 1 / sqrt nor x / sqrt")
        normed = only_consumer(inv.outputs[0], "Mul")
        if other_input(normed, inv.outputs[0]) is not x:
            raise Reject(f"{normed.name} does not multiply the normalized input by its rsqrt")
        interior.append(normed)
    scale_mul = only_consumer(normed.outputs[0], "Mul")
    scale = other_input(scale_mul, normed.outputs[0])
    if scale.shape is not None and len(scale.shape) != 1:
        raise Reject(f"scale {scale.name} has shape {scale.shape}, expected [hidden]")
    check_private([*interior, scale_mul], allowed_external=[scale_mul.outputs[0]])
    label = labels.norm_label(g, mean)
    return Site(label, [*interior, scale_mul], Norm(x, scale, eps, scale_mul.outputs[0], scale_mul))


def _match_onnx(g: PassGraph, node: gs.Node) -> Site:
    x, scale = node.inputs[0], node.inputs[1]
    axis = int(node.attrs.get("axis", -1))
    r = rank(x)
    if axis != -1 and (r is None or axis != r - 1):
        raise Reject(f"{node.name} normalizes from axis {axis}, not the last axis only")
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise Reject(f"{node.name}'s inv_std_var output is used")
    eps = float(node.attrs.get("epsilon", 1e-5))
    return Site(labels.norm_label(g, node), [node], Norm(x, scale, eps, node.outputs[0], node))


def rewrite(g: PassGraph, site: Site) -> None:
    n: Norm = site.data
    g.detach(n.last)
    g.node(OP, [n.x, n.scale], [n.out], like=site.nodes[0], domain=INTERNAL_DOMAIN, epsilon=n.epsilon)


def match_fused(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    """The match of the passes that lower this pass's RMSNorm node (expand_rmsnorm, lower_rmsnorm_ort)."""
    if node.domain != INTERNAL_DOMAIN:
        raise Reject(f"{node.name} is not the internal RMSNorm")
    return Site(labels.norm_label(g, node), [node], node)


def _label(g: PassGraph, node: gs.Node) -> str | None:
    return labels.norm_label(g, node)


PASS = Pass(
    name="fuse_rmsnorm",
    anchors=("ReduceMean", "RMSNormalization"),
    match=match,
    rewrite=rewrite,
    expected=labels.expected_norms,
    label=_label,
    doc=__doc__ or "",
)
run = PASS.__call__

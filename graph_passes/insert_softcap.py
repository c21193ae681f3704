"""insert_softcap: `c * tanh(x / c)` -> one `SoftCap(x, cap=c)` node.

    x ─ Div(c) ─ Tanh ─ Mul(c) ─> y        (also Mul(1/c) for the Div; c on either side of the Mul)
    ─>  x ─ SoftCap(cap=c) ─> y

Gemma 2 soft-caps the final logits (c = 30) and the attention scores (c = 50); the attention ones are
absorbed by insert_sliding_window_attention, which runs first, so this pass finds the logits. The
tanh-GELU of the MLP also has a Tanh, rejected here because no Mul(c) with the same c follows.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_graphsurgeon as gs

from export import io_contract as io
from export.config import Gemma2Config
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject, only_consumer, other_input, producer, scalar
from trt_plugins.softcap import SPEC


@dataclasses.dataclass(frozen=True)
class Cap:
    x: gs.Tensor
    cap: float
    out: gs.Tensor
    last: gs.Node


def match(g: PassGraph, tanh: gs.Node, config: Gemma2Config | None) -> Site:
    pre = producer(tanh.inputs[0], "Div", "Mul")
    x = pre.inputs[0]
    c_in = scalar(pre.inputs[1], f"{pre.op} operand")
    if pre.op == "Mul":
        if c_in == 0:
            raise Reject(f"{pre.name} multiplies by 0")
        c_in = 1.0 / c_in
    post = only_consumer(tanh.outputs[0], "Mul")
    c_out = scalar(other_input(post, tanh.outputs[0]), "Mul operand")
    if c_out <= 0 or not math.isclose(c_in, c_out, rel_tol=1e-6):
        raise Reject(f"x / {c_in:g} is scaled back by {c_out:g}: not a soft-cap")
    if len(pre.outputs[0].outputs) != 1:
        raise Reject(f"{pre.outputs[0].name} has other consumers")
    out = post.outputs[0]
    label = "logits" if out.name == io.LOGITS else f"soft-cap of {x.name}"
    return Site(label, [pre, tanh, post], Cap(x, c_out, out, post))


def rewrite(g: PassGraph, site: Site) -> None:
    c: Cap = site.data
    g.detach(c.last)
    g.node(SPEC.name, [c.x], [c.out], like=site.nodes[0], domain=SPEC.domain, **SPEC.attributes(cap=c.cap))


def expected(cfg: Gemma2Config) -> list[str]:
    return ["logits"] if cfg.final_logit_softcapping else []


PASS = Pass(
    name="insert_softcap",
    anchors=("Tanh",),
    match=match,
    rewrite=rewrite,
    expected=expected,
    doc=__doc__ or "",
)
run = PASS.__call__

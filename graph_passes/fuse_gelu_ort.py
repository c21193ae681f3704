"""fuse_gelu_ort: the tanh-approximated GELU (8 ops) -> com.microsoft.FastGelu.

    x ─┬─ Pow(3) ─ Mul(0.044715) ─┐
       ├─────────────────────── Add ─ Mul(√(2/π)) ─ Tanh ─ Add(1) ─ Mul(0.5) ─┐
       └───────────────────────────────────────────────────────────────────── Mul ─> y
    ─>  x ─ FastGelu ─> y          y = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))

    Gelu(approximate="tanh")  ─>  FastGelu          (what the exporter writes at opset >= 20)

Gemma 2's MLP activation (`gelu_pytorch_tanh`), as dynamo decomposes `F.gelu(approximate="tanh")`.
Constants may sit on either side of each binary op; the Mul(0.5) may come before or after the Mul(x).
onnxruntime's CPU kernel evaluates the same formula in one pass over the [B, S, intermediate] tensor.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import labels
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject, check_private, const_array, only_consumer, other_input, producer, scalar

MS_DOMAIN = "com.microsoft"
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@dataclasses.dataclass(frozen=True)
class Gelu:
    x: gs.Tensor
    out: gs.Tensor
    last: gs.Node


def _const_operand(node: gs.Node, what: str) -> tuple[float, gs.Tensor]:
    """(constant, other operand) of a binary op with one scalar constant input."""
    consts = [t for t in node.inputs if (arr := const_array(t)) is not None and arr.size == 1]
    if len(consts) != 1:
        raise Reject(f"{node.name} has no single scalar {what}")
    return scalar(consts[0], what), other_input(node, consts[0])


def _near(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-3)  # the constants as fp16/bf16 graphs store them


def match(g: PassGraph, tanh: gs.Node, config: Gemma2Config | None) -> Site:
    if tanh.op == "Gelu":
        approximate = tanh.attrs.get("approximate", "none")
        if approximate != "tanh":
            raise Reject(f"{tanh.name} is the exact GELU (approximate={approximate!r}), Gemma 2's is tanh")
        layer = g.layer_of(tanh)
        return Site(None if layer is None else f"layer {layer}", [tanh], Gelu(tanh.inputs[0], tanh.outputs[0], tanh))
    scale_mul = producer(tanh.inputs[0], "Mul")
    k, inner = _const_operand(scale_mul, "√(2/π)")
    if not _near(k, _SQRT_2_OVER_PI):
        raise Reject(f"Tanh argument scaled by {k:g}, not √(2/π)")
    add = producer(inner, "Add")
    cube_term = next((t for t in add.inputs if t.inputs and t.inputs[0].op == "Mul"), None)
    if cube_term is None:
        raise Reject(f"{add.name} has no 0.044715·x³ term")
    x = other_input(add, cube_term)
    c, cube = _const_operand(cube_term.inputs[0], "0.044715")
    pow_node = producer(cube, "Pow")
    if not _near(c, 0.044715) or pow_node.inputs[0] is not x or scalar(pow_node.inputs[1], "exponent") != 3.0:
        raise Reject(f"{add.name} is not x + 0.044715·x³")
    one_add = only_consumer(tanh.outputs[0], "Add")
    one, _ = _const_operand(one_add, "1")
    if one != 1.0:
        raise Reject(f"{one_add.name} adds {one:g}, not 1")
    nxt = only_consumer(one_add.outputs[0], "Mul")
    # 0.5 * (1 + tanh) then * x, or x * (1 + tanh) then * 0.5
    consts = [t for t in nxt.inputs if const_array(t) is not None]
    if consts:
        half, _ = _const_operand(nxt, "0.5")
        last = only_consumer(nxt.outputs[0], "Mul")
        if other_input(last, nxt.outputs[0]) is not x:
            raise Reject(f"{last.name} does not multiply by x")
    else:
        if other_input(nxt, one_add.outputs[0]) is not x:
            raise Reject(f"{nxt.name} does not multiply by x")
        last = only_consumer(nxt.outputs[0], "Mul")
        half, _ = _const_operand(last, "0.5")
    if half != 0.5:
        raise Reject(f"GELU halves by {half:g}")
    nodes = [pow_node, cube_term.inputs[0], add, scale_mul, tanh, one_add, nxt, last]
    check_private(nodes, allowed_external=[last.outputs[0]])
    layer = g.layer_of(tanh)
    return Site(None if layer is None else f"layer {layer}", nodes, Gelu(x, last.outputs[0], last))


def rewrite(g: PassGraph, site: Site) -> None:
    gelu: Gelu = site.data
    g.detach(gelu.last)
    g.node("FastGelu", [gelu.x], [gelu.out], like=site.nodes[min(4, len(site.nodes) - 1)], domain=MS_DOMAIN)


def _label(g: PassGraph, tanh: gs.Node) -> str | None:
    layer = g.layer_of(tanh)
    return None if layer is None else f"layer {layer}"


PASS = Pass(
    name="fuse_gelu_ort",
    anchors=("Tanh", "Gelu"),
    match=match,
    rewrite=rewrite,
    expected=labels.expected_layers,  # one MLP per layer
    label=_label,
    doc=__doc__ or "",
)
run = PASS.__call__

"""expand_softcap: `SoftCap(x, cap=c)` -> standard ONNX ops (the `trt-native` target).

    SoftCap(x)  ─>  [Cast f32] ─ Div(c) ─ Tanh ─ Mul(c) ─ [Cast back]

The plugin spec computes in fp32 whatever x's dtype, so a non-fp32 x is cast around the math.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import primitives
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject
from trt_plugins.softcap import SPEC


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.domain != SPEC.domain:
        raise Reject(f"{node.name} is not in domain {SPEC.domain}")
    return Site("logits" if node.outputs[0].name == "logits" else None, [node], node)


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    x, out = node.inputs[0], node.outputs[0]
    g.detach(node)
    y = primitives.softcap(g, primitives.cast(g, x, np.float32, node), float(SPEC.parse(node.attrs)["cap"]), node)
    y = primitives.cast(g, y, primitives.dtype_of(x) or np.float32, node)
    g.produce_into(y, out, node)


PASS = Pass(name="expand_softcap", anchors=(SPEC.name,), match=match, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

"""expand_rmsnorm: an RMSNorm node left after sandwich fusion -> standard ONNX ops.

    RMSNorm(x, scale)  ─>  x ─┬─ Pow(2) ─ ReduceMean(-1) ─ Add(eps) ─ Sqrt ─ Reciprocal ─┐
                              └──────────────────────────────────────────────────── Mul ─ Mul(scale)

Gemma 2 keeps one: the first layer's input norm (every other norm is half of a sandwich). TensorRT has
no RMSNorm plugin here and fuses this pattern itself; `trt` and `trt-native` lower it this way.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graph_passes import primitives
from graph_passes.driver import Pass, Site
from graph_passes.fuse_rmsnorm import OP, match_fused
from graph_passes.graph import PassGraph


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    x, scale = node.inputs
    out = node.outputs[0]
    g.detach(node)
    y = primitives.rmsnorm(g, x, scale, float(node.attrs["epsilon"]), like=node)
    if primitives.dtype_of(out) not in (None, primitives.dtype_of(y)):
        y = primitives.cast(g, y, out.dtype, node)
    g.produce_into(y, out, node)


PASS = Pass(name="expand_rmsnorm", anchors=(OP,), match=match_fused, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

"""lower_rmsnorm_ort: RMSNorm -> onnxruntime's SimplifiedLayerNormalization (default domain).

    RMSNorm(x, scale)  ─>  SimplifiedLayerNormalization(x, scale, axis=-1, epsilon, stash_type=1)

onnxruntime registers SimplifiedLayerNormalization in the default ONNX domain (it is a contrib op,
not a standard one); its CPU kernel computes x * rsqrt(mean(x²) + eps) * scale in fp32 for fp32 x.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graph_passes.driver import Pass, Site
from graph_passes.fuse_rmsnorm import OP, match_fused
from graph_passes.graph import PassGraph

ORT_OP = "SimplifiedLayerNormalization"


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    x, scale = node.inputs
    out = node.outputs[0]
    g.detach(node)
    g.node(ORT_OP, [x, scale], [out], like=node, axis=-1, epsilon=float(node.attrs["epsilon"]), stash_type=1)


PASS = Pass(name="lower_rmsnorm_ort", anchors=(OP,), match=match_fused, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

"""lower_sandwich_ort: SandwichRMSNorm -> SimplifiedLayerNormalization + SkipSimplifiedLayerNormalization.

    SandwichRMSNorm(x, residual, post_scale, pre_scale)
      ─>  p = SimplifiedLayerNormalization([Cast f32] x, post_scale)
          normed, _, _, residual_out = com.microsoft.SkipSimplifiedLayerNormalization(p, residual, pre_scale)
          normed = [Cast x.dtype] normed

SkipSimplifiedLayerNormalization adds its two inputs, returns the sum as its 4th output and the
normalized sum as its 1st: exactly the residual add and the next pre-norm. It needs one dtype for
input, skip and gamma, so the residual must be fp32 (fp32 and fp16 exports; a bf16 residual is
rejected, and onnxruntime's CPU kernels do not run bf16 models anyway).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import primitives
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.lower_rmsnorm_ort import ORT_OP as SIMPLIFIED
from graph_passes.match import Reject
from trt_plugins.sandwich_rmsnorm import SPEC

SKIP = "SkipSimplifiedLayerNormalization"
MS_DOMAIN = "com.microsoft"


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.domain != SPEC.domain:
        raise Reject(f"{node.name} is not in domain {SPEC.domain}")
    residual = node.inputs[1]
    if primitives.dtype_of(residual) not in (None, np.dtype(np.float32)):
        raise Reject(f"residual {residual.name} is {residual.dtype}; SkipSimplifiedLayerNormalization needs fp32 here")
    return Site(None, [node], node)


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    x, residual, post_scale, pre_scale = node.inputs
    residual_out, normed = node.outputs
    eps = float(SPEC.parse(node.attrs)["epsilon"])
    g.detach(node)
    xf = primitives.cast(g, x, np.float32, node)
    p = g.op(
        SIMPLIFIED, [xf, post_scale], like=node, dtype=np.float32, shape=x.shape, axis=-1, epsilon=eps, stash_type=1
    )
    normed_f = g.variable(f"{node.name}/normed_f32", np.float32, residual.shape)
    empty = gs.Variable.empty()
    g.node(
        SKIP,
        [p, residual, pre_scale],
        [normed_f, empty, gs.Variable.empty(), residual_out],
        like=node,
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    g.produce_into(primitives.cast(g, normed_f, primitives.dtype_of(x) or np.float32, node), normed, node)


PASS = Pass(name="lower_sandwich_ort", anchors=(SPEC.name,), match=match, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

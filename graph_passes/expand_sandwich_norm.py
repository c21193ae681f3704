"""expand_sandwich_norm: `SandwichRMSNorm` -> standard ONNX ops (the `trt-native` target).

    SandwichRMSNorm(x, residual, post_scale, pre_scale)
      ─>  residual_out = residual + Cast_r(rmsnorm(Cast_f32(x)) * post_scale)
          normed       = Cast_x(rmsnorm(Cast_f32(residual_out)) * pre_scale)

Casts appear only where dtypes differ (fp16 weights: x fp16, residual fp32), as in export/model.py.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes import primitives
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject
from trt_plugins.sandwich_rmsnorm import SPEC


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    if node.domain != SPEC.domain:
        raise Reject(f"{node.name} is not in domain {SPEC.domain}")
    return Site(None, [node], node)


def rewrite(g: PassGraph, site: Site) -> None:
    node: gs.Node = site.data
    x, residual, post_scale, pre_scale = node.inputs
    residual_out, normed = node.outputs
    eps = float(SPEC.parse(node.attrs)["epsilon"])
    rdt = primitives.dtype_of(residual) or np.float32
    g.detach(node)
    post = primitives.cast(g, primitives.rmsnorm(g, x, post_scale, eps, node), rdt, node)
    g.node("Add", [residual, post], [residual_out], like=node)
    pre = primitives.rmsnorm(g, residual_out, pre_scale, eps, node)
    pre = primitives.cast(g, pre, primitives.dtype_of(x) or np.float32, node)
    g.produce_into(pre, normed, node)


PASS = Pass(name="expand_sandwich_norm", anchors=(SPEC.name,), match=match, rewrite=rewrite, doc=__doc__ or "")
run = PASS.__call__

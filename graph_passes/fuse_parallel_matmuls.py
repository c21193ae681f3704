"""fuse_parallel_matmuls: projections of one input -> one wider MatMul and a Split (the `ort` target).

    x ─┬─ MatMul(W_q [D, Nq]) ─> q           x ─ MatMul(Concat(W_q, W_k, W_v; axis 1)) ─ Split(-1, [Nq, Nk, Nv])
       ├─ MatMul(W_k [D, Nk]) ─> k     ─>                                                 ─> q, k, v
       └─ MatMul(W_v [D, Nv]) ─> v

Gemma 2 has two such groups per layer: q/k/v (the attention's input) and gate/up (the MLP's). One
GEMM of the summed width replaces two or three narrower ones: fewer passes over the activations, one
packed weight panel instead of three (and, at one decoded row, one kernel call where three each paid
their own threading overhead). The weights stay what the export wrote: the pass writes a `Concat` of
the initializers, which onnxruntime folds into one packed weight when the session loads, so
optimizing never reads or rewrites the weights file. Measured on CPU in benchmarks/ort_targets/.

A group is every MatMul that takes `x` as its first input with a constant 2-D weight of the same
input width and dtype; a lone projection (o_proj, down_proj, the head) is not a site.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject

# export/onnx_export keeps checkpoint names: model.layers.3.self_attn.q_proj.weight(.T)
_PROJ = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.weight")
GROUPS = ("q_proj+k_proj+v_proj", "gate_proj+up_proj")


@dataclasses.dataclass(frozen=True)
class Group:
    x: gs.Tensor
    matmuls: list[gs.Node]
    weights: list[gs.Constant]  # matmuls[i]'s


def _weight(node: gs.Node) -> gs.Constant | None:
    w = node.inputs[1] if len(node.inputs) == 2 else None
    if isinstance(w, gs.Constant) and len(w.shape) == 2:
        return w
    return None


def match(g: PassGraph, node: gs.Node, config: Gemma2Config | None) -> Site:
    w = _weight(node)
    if w is None:
        raise Reject(f"{node.name}'s weight is not a constant 2-D initializer")
    x = node.inputs[0]
    members = [
        (m, mw)
        for m in x.outputs
        if m.op == "MatMul"
        and m.inputs[0] is x
        and (mw := _weight(m)) is not None
        and mw.shape[0] == w.shape[0]
        and mw.dtype == w.dtype
    ]
    if len(members) < 2:
        raise Reject(f"{node.name} is the only projection of {x.name}")
    matmuls, weights = [m for m, _ in members], [mw for _, mw in members]
    return Site(_label(weights), matmuls, Group(x, matmuls, weights))


def _label(weights: list[gs.Constant]) -> str | None:
    found = [m.groups() for w in weights if (m := _PROJ.search(w.name))]  # (layer, projection)
    if len(found) != len(weights) or len({layer for layer, _ in found}) != 1:
        return None
    return f"layer {found[0][0]} " + "+".join(proj for _, proj in found)


def rewrite(g: PassGraph, site: Site) -> None:
    group: Group = site.data
    weights = group.weights
    widths = [int(w.shape[1]) for w in weights]
    outs = [m.outputs[0] for m in group.matmuls]
    first = group.matmuls[0]
    g.detach(*group.matmuls)
    shape = [weights[0].shape[0], sum(widths)]
    packed = g.op("Concat", list(weights), like=first, dtype=weights[0].dtype, shape=shape, axis=1)
    y = g.op("MatMul", [group.x, packed], like=first, dtype=group.x.dtype)
    g.node("Split", [y, g.constant("widths", np.array(widths, np.int64))], outs, like=first, axis=-1)


def _expected(cfg: Gemma2Config) -> list[str]:
    return [f"layer {i} {k}" for i in range(cfg.num_hidden_layers) for k in GROUPS]


PASS = Pass(
    name="fuse_parallel_matmuls",
    anchors=("MatMul",),
    match=match,
    rewrite=rewrite,
    expected=_expected,
    doc=__doc__ or "",
)
run = PASS.__call__

"""lower_tied_head_ort: the tied LM head `MatMul(x, Transpose(E))` -> `Gemm(x, E, transB=1)` (the `ort` target).

    x [B, S, D] ─────────────── MatMul ─> y [B, S, V]
    E [V, D] ─ Transpose ───────┘
    ─>  x ─ Reshape [-1, D] ─ Gemm(transB=1) ─ Reshape [B, S, V] ─> y
        E [V, D] ─────────────┘

With tied embeddings the export keeps one copy of the embedding, used by the lookup (Gather) and, through
a Transpose, by the head. onnxruntime folds that Transpose into a second [D, V] copy of the largest
tensor of the model at session start, and its fused Transpose+MatMul is slower at one row (decode) than
Gemm with transB. Gemm reads E as stored: one copy in memory, and less time per decoded token
(benchmarks/ort_targets/results.md). An untied head (`lm_head.weight.T`, no Transpose) is left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes.driver import Pass, Site
from graph_passes.graph import PassGraph
from graph_passes.match import Reject, producer, rank


@dataclasses.dataclass(frozen=True)
class Head:
    x: gs.Tensor
    embedding: gs.Constant
    matmul: gs.Node


def match(g: PassGraph, matmul: gs.Node, config: Gemma2Config | None) -> Site:
    transpose = producer(matmul.inputs[1], "Transpose")
    e = transpose.inputs[0]
    if not isinstance(e, gs.Constant) or len(e.shape) != 2:
        raise Reject(f"{transpose.name} does not transpose a 2-D weight")
    if list(transpose.attrs.get("perm", [1, 0])) != [1, 0]:
        raise Reject(f"{transpose.name} has perm {transpose.attrs.get('perm')}")
    if rank(matmul.inputs[0]) not in (None, 3):
        raise Reject(f"{matmul.name} multiplies a rank-{rank(matmul.inputs[0])} input, not [B, S, D]")
    if not any(c.op == "Gather" for c in e.outputs):
        raise Reject(f"{e.name} is not also the embedding lookup (not a tied head)")
    nodes = [matmul] + ([transpose] if len(transpose.outputs[0].outputs) == 1 else [])
    return Site("lm_head", nodes, Head(matmul.inputs[0], e, matmul))


def rewrite(g: PassGraph, site: Site) -> None:
    head: Head = site.data
    node, out = head.matmul, head.matmul.outputs[0]
    vocab, hidden = (int(d) for d in head.embedding.shape)
    g.detach(node)
    x = head.x
    rows = g.op("Reshape", [x, g.constant("rows", [-1, hidden], np.int64)], like=node, dtype=x.dtype)
    y = g.op("Gemm", [rows, head.embedding], like=node, dtype=x.dtype, transB=1)
    batch_seq = g.op("Shape", [x], like=node, dtype=np.int64, shape=[2], start=0, end=2)
    shape = g.op("Concat", [batch_seq, g.constant("vocab", [vocab], np.int64)], like=node, dtype=np.int64, axis=0)
    g.node("Reshape", [y, shape], [out], like=node)


def _expected(cfg: Gemma2Config) -> list[str]:
    return ["lm_head"] if cfg.tie_word_embeddings else []


PASS = Pass(
    name="lower_tied_head_ort", anchors=("MatMul",), match=match, rewrite=rewrite, expected=_expected, doc=__doc__ or ""
)
run = PASS.__call__

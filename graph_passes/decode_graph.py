"""decode_graph: the one-token form of an in-place `ort` graph, each attention `If` replaced by its
GroupQueryAttention branch (a derived graph for a runtime, not a pass of any target).

    If(S == 1 and C > max(position)) ─ then: GroupQueryAttention ─┐
                                      └ else: standard ops ───────┴─>  out
    ─>  GroupQueryAttention ─> out

The `ort` target keeps both step kinds in one graph behind a per-layer `If` (docs/kv_cache.md), and
onnxruntime runs an `If` as a subgraph call, a few µs per layer per step. On a model whose layers take
microseconds that is a fifth of a decode step; a runtime that knows a step is a one-token step on
buffers that hold positions unwrapped (what the `If` tests) may run this graph instead. Valid only
under that condition, which the caller guarantees: the branches are not checked against it here.
"""

from __future__ import annotations

import onnx

GQA = "GroupQueryAttention"


def _has_gqa(graph: onnx.GraphProto) -> bool:
    return any(n.op_type == GQA for n in graph.node)


def _then_branch(node: onnx.NodeProto) -> onnx.GraphProto | None:
    """The then-branch of an attention `If` lowered for the CPU (GroupQueryAttention there, not in else)."""
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    then, other = branches.get("then_branch"), branches.get("else_branch")
    if then is None or other is None or not _has_gqa(then) or _has_gqa(other):
        return None
    return then


def decode_graph(model: onnx.ModelProto) -> int:
    """Inline, in `model`, the GroupQueryAttention branch of every top-level attention `If`; returns how many
    (0: not an in-place `ort` graph of the CPU form, `model` unchanged)."""
    g = model.graph
    names = {i.name for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in g.node:
        branch = _then_branch(node) if node.op_type == "If" else None
        if branch is None:
            nodes.append(node)
            continue
        count += 1
        rename = {o.name: out for o, out in zip(branch.output, node.output, strict=True)}
        produced = set()
        for n in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.output[:] = [rename.get(o, o) for o in copy.output]
            produced.update(n.output)
            nodes.append(copy)
        for o in branch.output:
            if o.name not in produced:  # a branch output passed through from the outer scope
                nodes.append(onnx.helper.make_node("Identity", [o.name], [rename[o.name]]))
        for init in branch.initializer:
            if init.name not in names:
                g.initializer.append(init)
                names.add(init.name)
    if count:
        live = _live(nodes, [o.name for o in g.output])
        read = {i for n in live for i in n.input} | {i for n in live for i in _subgraph_reads(n)}
        unread = [i for i in g.initializer if i.name not in read]  # the conditions' constants
        for init in unread:
            g.initializer.remove(init)
        del g.node[:]
        g.node.extend(live)
    return count


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """`nodes` (in order) that some output depends on: the `If` conditions and what only the prompt
    branches read are left behind, so a step does not compute them."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    return keep[::-1]


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside `node`'s subgraphs, nested ones too (a superset of its outer-scope reads)."""
    reads: set[str] = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for n in a.g.node:
                reads.update(n.input)
                reads.update(_subgraph_reads(n))
    return reads

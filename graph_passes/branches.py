"""Conditional subgraphs: an `If` whose branches are first built as ordinary nodes, then moved inside.

A pass builds both alternatives in the main graph with the usual helpers (sharing what several sites
share through `PassGraph.memo`), makes an `If` whose branch graphs only name their outputs, and once
every site is rewritten calls `move_into_branches`: each branch takes the nodes that only it uses,
and the shared ones (a mask built once for a group of layers, the inputs both branches read) stay in
the main graph, where both branches read them as outer-scope values.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs

from graph_passes.graph import PassGraph

BRANCHES = ("then_branch", "else_branch")


def make_if(
    g: PassGraph,
    cond: gs.Tensor,
    then_outputs: list[gs.Tensor],
    else_outputs: list[gs.Tensor],
    outputs: list[gs.Tensor],
    like: gs.Node | None = None,
) -> gs.Node:
    """`If(cond)` producing `outputs`; its branches are filled by `move_into_branches`."""
    prefix = like.name if like is not None else "If"
    then_graph = gs.Graph(outputs=list(then_outputs), name=g.unique(f"{prefix}/then"))
    else_graph = gs.Graph(outputs=list(else_outputs), name=g.unique(f"{prefix}/else"))
    return g.node("If", [cond], list(outputs), like=like, then_branch=then_graph, else_branch=else_graph)


def move_into_branches(g: PassGraph, if_nodes: Iterable[gs.Node]) -> None:
    """Move into each branch of each `If` the main-graph nodes that only that branch's outputs need.

    All moves are decided before any is made, so a node shared by two branches (of one `If` or of
    several) is seen as shared and stays in the main graph.
    """
    if_nodes = list(if_nodes)
    _drop_dead(g, if_nodes)
    plans = [(branch, _exclusive(g, branch.outputs)) for node in if_nodes for branch in _branches(node)]
    moved: set[int] = set()
    for branch, nodes in plans:
        branch.nodes.extend(nodes)
        moved.update(id(n) for n in nodes)
    g.graph.nodes = [n for n in g.graph.nodes if id(n) not in moved]
    for branch, _ in plans:
        branch.toposort(recurse_subgraphs=False)


def _drop_dead(g: PassGraph, if_nodes: list[gs.Node]) -> None:
    """Remove the nodes nothing live reads: what the sites replaced (the export's RoPE, masks) would
    otherwise look like outside users and pin the nodes it shares with a branch in the main graph."""
    live: set[int] = set()
    stack = [t.inputs[0] for t in g.graph.outputs if t.inputs]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        sources = list(node.inputs)
        if node.op == "If":  # its branches still read their outputs from the main graph
            sources += [t for branch in _branches(node) for t in branch.outputs]
        stack.extend(t.inputs[0] for t in sources if t.inputs)
    if any(id(n) not in live for n in if_nodes):
        return  # an If the outputs do not reach: leave the graph to the usual cleanup
    for node in g.graph.nodes:
        if id(node) not in live:  # disconnect, so tensors stop listing it among their users
            node.inputs.clear()
            node.outputs.clear()
    g.graph.nodes = [n for n in g.graph.nodes if id(n) in live]


def _branches(node: gs.Node) -> list[gs.Graph]:
    return [node.attrs[name] for name in BRANCHES]


def _exclusive(g: PassGraph, outputs: list[gs.Tensor]) -> list[gs.Node]:
    """The producers behind `outputs` whose every result is consumed only among themselves (or is one of
    `outputs`): removing them from the main graph leaves nothing there without its input."""
    targets = {id(t) for t in outputs}
    ancestors: dict[int, gs.Node] = {}
    stack = [t.inputs[0] for t in outputs if t.inputs]
    while stack:
        node = stack.pop()
        if id(node) in ancestors:
            continue
        ancestors[id(node)] = node
        stack.extend(t.inputs[0] for t in node.inputs if t.inputs)
    keep = dict(ancestors)
    queue = [n for n in ancestors.values() if _used_outside(g, n, keep, targets)]
    while queue:
        node = queue.pop()
        if keep.pop(id(node), None) is None:
            continue
        for t in node.inputs:  # its producers now feed a node that stays outside
            if t.inputs and id(t.inputs[0]) in keep:
                queue.append(t.inputs[0])
    return [n for n in g.graph.nodes if id(n) in keep]


def _used_outside(g: PassGraph, node: gs.Node, inside: dict[int, gs.Node], targets: set[int]) -> bool:
    for t in node.outputs:
        if g.is_output(t) or any(
            id(user) not in inside and user.outputs for user in t.outputs
        ):  # (detached nodes don't count)
            return True
        if not t.outputs and id(t) not in targets:
            return True  # an unused result: the node stays where it was
    return False

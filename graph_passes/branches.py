"""Conditional subgraphs: an `If` whose branches are first built as ordinary nodes, then moved inside.

A pass builds both alternatives in the main graph with the usual helpers (sharing what several sites
share through `PassGraph.memo`), makes an `If` whose branch graphs only name their outputs, and once
every site is rewritten calls `move_into_branches`: each branch takes the nodes that only it uses,
and the shared ones (a mask built once for a group of layers, the inputs both branches read) stay in
the main graph, where both branches read them as outer-scope values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
    several) is seen as shared and stays in the main graph. Nested Ifs move in two calls, the inner
    ones first: an If whose branches are already filled counts as one node that reads what its
    branches read from outside, so the outer call moves it, with what its branches share, into the
    outer branch that alone needs it.
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
        stack.extend(t.inputs[0] for t in _sources(node) if t.inputs)
    if any(id(n) not in live for n in if_nodes):
        return  # an If the outputs do not reach: leave the graph to the usual cleanup
    for node in g.graph.nodes:
        if id(node) not in live:  # disconnect, so tensors stop listing it among their users
            node.inputs.clear()
            node.outputs.clear()
    g.graph.nodes = [n for n in g.graph.nodes if id(n) in live]


def _branches(node: gs.Node) -> list[gs.Graph]:
    return [node.attrs[name] for name in BRANCHES]


def _sources(node: gs.Node) -> list[gs.Tensor]:
    """What a node reads: its inputs and, for an If, what its branches read from outside them (their
    outputs while still built in the main graph, and the outer-scope inputs of nodes already moved in)."""
    if node.op != "If":
        return list(node.inputs)
    found = list(node.inputs)
    for branch in _branches(node):
        inner = _subgraph_nodes(branch)
        produced = {id(t) for n in inner for t in n.outputs}
        found += [t for n in inner for t in n.inputs if id(t) not in produced]
        found += [t for t in branch.outputs if id(t) not in produced]
    return found


def _subgraph_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The nodes of `graph` and, depth first, of the Ifs inside it."""
    out = []
    for n in graph.nodes:
        out.append(n)
        if n.op == "If":
            out += [m for branch in _branches(n) for m in _subgraph_nodes(branch)]
    return out


def _owners(g: PassGraph) -> dict[int, gs.Node]:
    """Node id -> the main-graph If whose branches (at any depth) hold that node."""
    return {id(m): n for n in g.graph.nodes if n.op == "If" for b in _branches(n) for m in _subgraph_nodes(b)}


def _exclusive(g: PassGraph, outputs: list[gs.Tensor]) -> list[gs.Node]:
    """The main-graph producers behind `outputs` whose every result is consumed only among themselves (or
    is one of `outputs`): removing them from the main graph leaves nothing there without its input. A
    node inside an If's branches counts as that If (its owner in the main graph)."""
    targets = {id(t) for t in outputs}
    owners = _owners(g)
    main = {id(n) for n in g.graph.nodes}

    def top(node: gs.Node) -> gs.Node | None:
        """The main-graph node standing for `node` (itself, or the If holding it); None if neither."""
        if id(node) in main:
            return node
        return owners.get(id(node))

    ancestors: dict[int, gs.Node] = {}
    stack = [t.inputs[0] for t in outputs if t.inputs]
    while stack:
        node = top(stack.pop())
        if node is None or id(node) in ancestors:
            continue
        ancestors[id(node)] = node
        stack.extend(t.inputs[0] for t in _sources(node) if t.inputs)
    keep = dict(ancestors)
    queue = [n for n in ancestors.values() if _used_outside(g, n, keep, targets, top)]
    while queue:
        node = queue.pop()
        if keep.pop(id(node), None) is None:
            continue
        for t in _sources(node):  # its producers now feed a node that stays outside
            producer = top(t.inputs[0]) if t.inputs else None
            if producer is not None and id(producer) in keep:
                queue.append(producer)
    return [n for n in g.graph.nodes if id(n) in keep]


def _used_outside(
    g: PassGraph,
    node: gs.Node,
    inside: dict[int, gs.Node],
    targets: set[int],
    top: Callable[[gs.Node], gs.Node | None],
) -> bool:
    for t in node.outputs:
        if g.is_output(t):
            return True
        for user in t.outputs:
            owner = top(user)
            if owner is not None and owner is not node and id(owner) not in inside and user.outputs:
                return True  # (detached nodes don't count)
        referenced = any(t is o for n in g.graph.nodes if n.op == "If" for b in _branches(n) for o in b.outputs)
        if not t.outputs and id(t) not in targets and not referenced:
            return True  # an unused result: the node stays where it was
        if referenced and id(t) not in targets and not _read_by_ifs_inside(g, t, inside):
            return True  # another branch (outside this set) names it as its output
    return False


def _read_by_ifs_inside(g: PassGraph, t: gs.Tensor, inside: dict[int, gs.Node]) -> bool:
    """Whether every If whose branch names `t` as an output is itself inside the set."""
    readers = [n for n in g.graph.nodes if n.op == "If" and any(t is o for b in _branches(n) for o in b.outputs)]
    return all(id(n) in inside for n in readers)

"""The loop every pass shares: try each anchor node, keep the sites, rewrite them, report.

A pass supplies `anchors` (op types a site starts from), `match(graph, node, config) -> Site` (raises
`Reject` with the reason), `rewrite(graph, site)`, the site labels its config implies, and optionally
`finish(graph)`, run once after all rewrites. Passes hold
no state; running one twice changes nothing the second time (its patterns are gone).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes.graph import PassGraph
from graph_passes.match import Reject
from graph_passes.report import PassReport, Rejection

log = logging.getLogger("g2trt.passes")


@dataclasses.dataclass
class Site:
    label: str | None  # "layer 3 attn", "logits"; None when the graph carries no layer information
    nodes: list[gs.Node]  # every node the site covers (anchor included)
    data: Any  # what rewrite needs, per pass


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    anchors: tuple[str, ...]
    match: Callable[[PassGraph, gs.Node, Gemma2Config | None], Site]
    rewrite: Callable[[PassGraph, Site], None]
    expected: Callable[[Gemma2Config], list[str] | None] = lambda cfg: None
    label: Callable[[PassGraph, gs.Node], str | None] = lambda g, node: None  # label of a rejected anchor
    doc: str = ""
    # after every site is rewritten: for edits that must see all of them (what stays shared between sites)
    finish: Callable[[PassGraph], None] | None = None

    def __call__(self, g: PassGraph, config: Gemma2Config | None = None, debug: bool = False) -> PassReport:
        return apply(self, g, config, debug)


def apply(p: Pass, g: PassGraph, config: Gemma2Config | None, debug: bool = False) -> PassReport:
    start = time.perf_counter()
    g.memo.clear()
    before = g.node_count()
    sites: list[Site] = []
    rejected: list[Rejection] = []
    consumed: set[int] = set()
    for node in [n for n in g.nodes if n.op in p.anchors]:
        if id(node) in consumed or not node.outputs:
            continue
        try:
            site = p.match(g, node, config)
            if any(id(n) in consumed for n in site.nodes):
                raise Reject("overlaps a site already matched")
        except Reject as e:
            label = _safe_label(p, g, node)
            rejected.append(Rejection(node.name, label, str(e)))
            if debug:
                log.warning("%s: rejected %s %s%s: %s", p.name, node.op, node.name, f" ({label})" if label else "", e)
            continue
        consumed.update(id(n) for n in site.nodes)
        sites.append(site)
    for site in sites:
        p.rewrite(g, site)
    if sites and p.finish is not None:
        p.finish(g)
    if sites:
        g.changed = True
        g.cleanup()
    labels = _labels(sites)
    expected = p.expected(config) if config is not None else None
    if debug:
        log.warning("%s: %d site(s) %s", p.name, len(sites), ", ".join(labels))
    return PassReport(p.name, labels, before, g.node_count(), time.perf_counter() - start, rejected, expected)


def _labels(sites: Sequence[Site]) -> list[str]:
    if any(s.label is None for s in sites):
        return [f"#{i}" for i in range(len(sites))]
    return [s.label for s in sites if s.label is not None]


def _safe_label(p: Pass, g: PassGraph, node: gs.Node) -> str | None:
    try:
        return p.label(g, node)
    except Reject:
        return None

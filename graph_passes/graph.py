"""The graph every pass edits: an onnx-graphsurgeon graph, plus the node metadata gs does not carry.

Models are loaded *without* their weight data: passes read only small constants (epsilon, scale,
soft-cap), and the weights stay in the external data file untouched, so optimizing a 27B export takes
seconds and no memory. dynamo's `namespace` metadata (`...layers.3.post_attention_layernorm: ...`)
is kept beside the graph so sites can be named by layer, and new nodes inherit the metadata of the
site they replace (profilers and debuggers still see which layer a fused node belongs to).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

INTERNAL_DOMAIN = "g2trt.internal"  # ops that exist only between passes; every target lowers them
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclasses.dataclass
class PassGraph:
    graph: gs.Graph
    metadata: dict[str, dict[str, str]]  # node name -> metadata_props
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict)  # subgraphs shared by sites of one pass run
    changed: bool = False  # a graph no pass changed is written back node for node, in its own order
    _counter: itertools.count = dataclasses.field(default_factory=itertools.count)
    _names: set[str] = dataclasses.field(default_factory=set)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> PassGraph:
        metadata = {n.name: {p.key: p.value for p in n.metadata_props} for n in proto.graph.node if n.name}
        graph = gs.import_onnx(proto)
        g = cls(graph, metadata)
        g._names = {n.name for n in graph.nodes} | set(graph.tensors())
        return g

    def to_proto(self) -> onnx.ModelProto:
        if self.changed:
            self.cleanup()
        proto = gs.export_onnx(self.graph, do_type_check=False)
        for node in all_nodes(proto.graph):
            for key, value in self.metadata.get(node.name, {}).items():
                node.metadata_props.add(key=key, value=value)
        return proto

    # --- reading -------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    def node_count(self) -> int:
        """Nodes of the graph and of the subgraphs inside it (If branches)."""

        def count(graph: gs.Graph) -> int:
            return sum(1 + sum(count(sub) for sub in n.subgraphs()) for n in graph.nodes)

        return count(self.graph)

    def input(self, name: str) -> gs.Variable | None:
        return next((t for t in self.graph.inputs if t.name == name), None)

    def namespace(self, node: gs.Node) -> str:
        return self.metadata.get(node.name, {}).get("namespace", "")

    def layer_of(self, node: gs.Node) -> int | None:
        """The decoder layer a node was traced in (dynamo metadata), if the export recorded it."""
        m = _LAYER.search(self.namespace(node))
        return int(m.group(1)) if m else None

    def is_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    # --- writing -------------------------------------------------------------------------------

    def unique(self, hint: str) -> str:
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    def variable(self, hint: str, dtype: Any = None, shape: Sequence[int | str | None] | None = None) -> gs.Variable:
        return gs.Variable(self.unique(hint), dtype=dtype, shape=list(shape) if shape is not None else None)

    def constant(self, hint: str, value: np.ndarray | float | int | Sequence[int], dtype: Any = None) -> gs.Constant:
        arr = np.asarray(value, dtype=dtype)
        return gs.Constant(self.unique(hint), arr)

    def node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor | None],
        outputs: Sequence[gs.Variable],
        *,
        like: gs.Node | None = None,
        domain: str | None = None,
        **attrs: Any,
    ) -> gs.Node:
        """Add a node; it takes the name prefix and metadata of `like` (the node of the site it replaces)."""
        empty = gs.Variable.empty()
        ins = [t if t is not None else empty for t in inputs]
        name = self.unique(f"{like.name}/{op}" if like is not None else op)
        node = gs.Node(op, name=name, attrs=attrs, inputs=ins, outputs=list(outputs), domain=domain)
        self.graph.nodes.append(node)
        if like is not None and like.name in self.metadata:
            self.metadata[name] = dict(self.metadata[like.name])
        return node

    def op(
        self,
        op: str,
        inputs: Sequence[gs.Tensor | None],
        *,
        like: gs.Node | None = None,
        dtype: Any = None,
        shape: Sequence[int | str | None] | None = None,
        domain: str | None = None,
        num_outputs: int = 1,
        **attrs: Any,
    ) -> gs.Variable:
        """Add a node with fresh output variable(s); returns the first output."""
        outs = [self.variable(f"{(like.name if like else op)}/{op}_out", dtype, shape) for _ in range(num_outputs)]
        self.node(op, inputs, outs, like=like, domain=domain, **attrs)
        return outs[0]

    def produce_into(self, value: gs.Tensor, out: gs.Variable, like: gs.Node) -> None:
        """Make `out` (an existing tensor whose producer was detached) hold `value`."""
        producer = value.inputs[0] if value.inputs else None
        if producer is None or len(value.outputs) or self.is_output(value):
            self.node("Identity", [value], [out], like=like)
            return
        producer.outputs[producer.outputs.index(value)] = out

    @staticmethod
    def detach(*nodes: gs.Node) -> None:
        """Drop `nodes`' outputs so cleanup removes them (their output tensors get new producers)."""
        for n in nodes:
            n.outputs.clear()

    def cleanup(self) -> None:
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and, depth first, those of the subgraphs in their attributes (If branches)."""
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += all_nodes(attr.g)
    return found

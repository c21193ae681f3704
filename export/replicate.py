"""The graph of an N-layer Gemma 2 from the trace of its first layers: one traced layer per layer kind.

Why: torch.export's symbolic-shape tracing, its decomposition pass and onnxscript's optimizer cost about a
second per decoder layer (the optimizer's pattern matcher grows quadratically with the graph), yet every
layer of a kind traces to the same subgraph. So the exporter traces the shortest prefix of the model that
holds every kind (2 layers for Gemma 2's sliding/global alternation) and `replicate` copies each kind's
traced layer for the remaining layers: renamed weights, its own cache input and output, wired into the
residual stream. The result equals a full trace up to value and node names (tests/export/test_replicate.py
compares `fingerprint`s and onnxruntime outputs for both cache contracts and every dtype).

What a layer is, read from the graph's data flow alone (the in-place trace keeps no module scope for most
of a layer's nodes, and the optimizer's rewrites keep none, so metadata cannot say it):
- its weights: initializers whose checkpoint source is `model.layers.{i}.*`; its cache: the inputs
  `past_key_values.{i}.*` and the outputs `present.{i}.*`;
- the residual stream entering layer i: the last value every data path from `input_ids` to `logits`
  passes through before any of layer i's weights is used;
- its nodes: those that depend on its stream, weights or cache and not on the stream leaving it. Nodes that
  depend on none of them (shapes, masks, RoPE tables, constants; the optimizer's CSE keeps one copy for all
  layers) are shared: a copied layer reads them, as the later layers of a full trace do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable

import onnx_ir as ir

from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError

TRANSFORM = "g2trt_transform"  # Value.meta key of a placeholder weight's source (export.onnx_export)
_LAYER_SOURCE = re.compile(r"^model\.layers\.(\d+)\.")
_SHAPE_OPS = ("Shape", "Size")  # read a tensor's shape, not its data
_UNBACKED = re.compile(r"\bu(\d+)\b")  # torch.export's data-dependent sizes: u0, u1, ...


class ReplicateError(G2trtError, RuntimeError):
    """The traced prefix does not split into layers as `replicate` needs; export with `full_trace=True`."""


def prefix_config(cfg: Gemma2Config) -> Gemma2Config:
    """The shortest prefix of `cfg`'s layers that holds every layer kind."""
    k = 1 + max(cfg.layer_types.index(kind) for kind in set(cfg.layer_types))
    return cfg.replace(num_hidden_layers=k, layer_types=cfg.layer_types[:k])


def replicate(model: ir.Model, cfg: Gemma2Config) -> ir.Model:
    """Grow `model`, the trace of `prefix_config(cfg)`, in place into the graph of all of `cfg`'s layers.

    Copied nodes go after the traced layers and before the final norm, their weights after the traced
    layers' weights: node and initializer order (and so the data file's layout) are a full trace's.
    """
    graph = model.graph
    k = _num_layers(graph)
    if k == cfg.num_hidden_layers:
        return model
    layers = _split_layers(graph, k)
    template = {kind: layers[t] for t, kind in enumerate(cfg.layer_types[:k])}  # each kind's last traced layer
    names = {x.name or "" for x in [*_all_values(graph), *graph]}
    unbacked = _Unbacked(graph)
    stream = layers[-1].stream_out
    copies = []
    for j in range(k, cfg.num_hidden_layers):
        copies.append(_copy_layer(graph, template[cfg.layer_types[j]], j, stream, names, unbacked.fresh()))
        stream = copies[-1].stream_out
    tail = _descendant_nodes(graph, [layers[-1].stream_out])  # the final norm and the head
    for node in tail:
        for i, v in enumerate(node.inputs):
            if v is layers[-1].stream_out:
                node.replace_input_with(i, stream)
    graph.remove(tail)
    graph.extend(n for c in copies for n in c.nodes)
    graph.extend(tail)
    _insert_initializers(graph, after=layers[-1].weights, new=[w for c in copies for w in c.weights])
    inputs = {v.name or "": v for v in [*graph.inputs, *(v for c in copies for v in c.pasts)]}
    outputs = {v.name or "": v for v in [*graph.outputs, *(v for c in copies for v in c.presents)]}
    kv = io.contract_of(list(inputs))
    graph.inputs[:] = [inputs[name] for name in io.input_names(cfg, kv)]
    graph.outputs[:] = [outputs[name] for name in io.output_names(cfg)]
    return model


def _insert_initializers(graph: ir.Graph, after: list[ir.Value], new: list[ir.Value]) -> None:
    """Add `new` initializers right after the last of `after` (the dict keeps insertion order)."""
    names = list(graph.initializers)
    cut = max(names.index(v.name) for v in after if v.name is not None) + 1
    moved = [graph.initializers.pop(name) for name in names[cut:]]
    for value in [*new, *moved]:
        graph.initializers.add(value)


# --- finding the layers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    index: int
    nodes: list[ir.Node]  # in graph order
    weights: list[ir.Value]
    stream_in: ir.Value
    stream_out: ir.Value


def _num_layers(graph: ir.Graph) -> int:
    return sum(1 for v in graph.inputs if v.name and v.name.startswith("past_key_values.") and v.name.endswith(".key"))


def _source(value: ir.Value) -> str | None:
    t = value.meta.get(TRANSFORM)
    return getattr(t, "source", None)


def _split_layers(graph: ir.Graph, k: int) -> list[_Layer]:
    weights: dict[int, list[ir.Value]] = {t: [] for t in range(k)}
    for value in graph.initializers.values():
        if m := _LAYER_SOURCE.match(_source(value) or ""):
            weights[int(m.group(1))].append(value)
    if any(not w for w in weights.values()):
        raise ReplicateError("the traced graph has no placeholder weights for some layer")
    streams = _streams(graph, [weights[t] for t in range(k)])
    inputs = {v.name: v for v in graph.inputs}
    layers = []
    for t in range(k):
        cache = [inputs[io.past_name(t, kind)] for kind in ("key", "value")]
        inside = _descendant_nodes(graph, [streams[t], *weights[t], *cache])
        after = set(_descendant_nodes(graph, [streams[t + 1]]))
        nodes = [n for n in inside if n not in after]
        if streams[t + 1].producer() not in nodes:
            raise ReplicateError(f"layer {t}'s residual stream does not leave from its own nodes")
        layers.append(_Layer(t, nodes, weights[t], streams[t], streams[t + 1]))
    seen: set[ir.Node] = set()
    for layer in layers:
        if seen & set(layer.nodes):
            raise ReplicateError(f"layer {layer.index} shares nodes with an earlier layer")
        seen |= set(layer.nodes)
    return layers


def _streams(graph: ir.Graph, weights: list[list[ir.Value]]) -> list[ir.Value]:
    """The residual stream entering each traced layer, and the one leaving the last.

    The stream entering layer t is the last cut value (see `_cut_values`) that none of its weights reaches;
    the stream leaving it, the first cut value that all of them reach. Between two traced layers both
    definitions must name the same value."""
    inputs = {v.name: v for v in graph.inputs}
    chain = _cut_values(graph, inputs[io.INPUT_IDS], _output(graph, io.LOGITS))
    streams: list[ir.Value] = []
    for t, layer_weights in enumerate(weights):
        reached = _descendant_values(graph, layer_weights)
        entering = [c for c in chain if c not in reached]
        every = set.intersection(*(_descendant_values(graph, [w]) for w in layer_weights))
        leaving = [c for c in chain if c in every]
        if not entering or not leaving:
            raise ReplicateError(f"no residual stream value found around layer {t}")
        if not streams:
            streams.append(entering[-1])
        elif entering[-1] is not streams[-1]:
            raise ReplicateError(f"the stream leaving layer {t - 1} is not the one entering layer {t}")
        streams.append(leaving[0])
    return streams


def _output(graph: ir.Graph, name: str) -> ir.Value:
    return next(v for v in graph.outputs if v.name == name)


def _data_consumers(value: ir.Value) -> Iterable[ir.Node]:
    """Consumers of `value`'s data: a Shape of a graph input reads a size every layer shares, not data."""
    for node in value.consumers():
        if node.op_type in _SHAPE_OPS and node.domain == "" and (value.is_graph_input() or value.is_initializer()):
            continue
        yield node


def _descendant_nodes(graph: ir.Graph, sources: Iterable[ir.Value]) -> list[ir.Node]:
    """Nodes that depend on the data of any of `sources`, in graph order."""
    reached: set[ir.Node] = set()
    stack = [n for v in sources for n in _data_consumers(v)]
    while stack:
        node = stack.pop()
        if node in reached:
            continue
        reached.add(node)
        stack += [c for out in node.outputs for c in out.consumers()]
    return [n for n in graph if n in reached]


def _descendant_values(graph: ir.Graph, sources: Iterable[ir.Value]) -> set[ir.Value]:
    sources = list(sources)
    return set(sources) | {v for n in _descendant_nodes(graph, sources) for v in n.outputs}


def _cut_values(graph: ir.Graph, source: ir.Value, sink: ir.Value) -> list[ir.Value]:
    """Values every data path from `source` to `sink` passes through, in order (a topological sweep:
    after such a value is produced, every edge still open starts at it)."""
    forward = set(_descendant_nodes(graph, [source]))
    backward: set[ir.Node] = set()
    stack = [sink.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in backward or node not in forward:
            continue
        backward.add(node)
        stack += [v.producer() for v in node.inputs if v is not None]
    sub = [n for n in graph if n in backward]
    members = set(sub)
    open_edges: Counter[ir.Value] = Counter(
        {source: sum(1 for n in _data_consumers(source) if n in members for v in n.inputs if v is source)}
    )
    chain = [source]
    for node in sub:
        for v in node.inputs:
            if v is not None and v in open_edges:
                open_edges[v] -= 1
                if not open_edges[v]:
                    del open_edges[v]
        for out in node.outputs:
            uses = sum(1 for c in out.consumers() if c in members for v in c.inputs if v is out)
            if uses:
                open_edges[out] = uses
        if len(open_edges) == 1:
            chain.append(next(iter(open_edges)))
    return chain


def _all_values(graph: ir.Graph) -> Iterable[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


# --- copying a layer ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Copy:
    nodes: list[ir.Node]
    weights: list[ir.Value]
    pasts: list[ir.Value]  # its cache inputs
    presents: list[ir.Value]  # its cache outputs
    stream_out: ir.Value


def _copy_layer(
    graph: ir.Graph,
    template: _Layer,
    j: int,
    stream: ir.Value,
    names: set[str],
    shape: Callable[[ir.Shape | None], ir.Shape | None],
) -> _Copy:
    """Layer j as a copy of `template` reading `stream`; `shape` gives each copied value its shape."""
    t = template.index
    rename = _renamer(t, j)
    mapping: dict[ir.Value, ir.Value] = {template.stream_in: stream}
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    pasts, weights = [], []
    for kind in ("key", "value"):
        old = inputs[io.past_name(t, kind)]
        mapping[old] = ir.Value(name=io.past_name(j, kind), shape=shape(old.shape), type=old.type)
        pasts.append(mapping[old])
    for w in template.weights:
        new = ir.Value(name=rename(w.name or ""), shape=shape(w.shape), type=w.type)
        new.meta[TRANSFORM] = dataclasses.replace(w.meta[TRANSFORM], source=rename(_source(w) or ""))
        mapping[w] = new
        weights.append(new)
    present = {outputs[io.present_name(t, kind)]: io.present_name(j, kind) for kind in ("key", "value")}
    nodes = []
    for node in template.nodes:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise ReplicateError(f"a {node.op_type} node with a subgraph in layer {t}")
        outs = [
            ir.Value(name=present.get(out) or _unique(f"{out.name}_l{j}", names), shape=shape(out.shape), type=out.type)
            for out in node.outputs
        ]
        copy = ir.Node(
            node.domain,
            node.op_type,
            [None if v is None else mapping.get(v, v) for v in node.inputs],
            list(node.attributes.values()),
            overload=node.overload,
            outputs=outs,
            version=node.version,
            name=_unique(f"{node.name}_l{j}", names),
            metadata_props={key: rename(value) for key, value in node.metadata_props.items()},
        )
        mapping.update(zip(node.outputs, outs, strict=True))
        nodes.append(copy)
    return _Copy(nodes, weights, pasts, [mapping[v] for v in present], mapping[template.stream_out])


class _Unbacked:
    """New names for the data-dependent sizes (`u0`, `u1`, ... in torch.export) of each copied layer.

    A full trace gives every layer its own: the size of layer 5's `new[:, :, S - min(S, C):]` is a new symbol
    there, not layer 1's, though the two are equal."""

    def __init__(self, graph: ir.Graph) -> None:
        used = [int(m) for v in _all_values(graph) if v.shape for d in v.shape for m in _UNBACKED.findall(str(d))]
        self.next = max(used, default=-1) + 1

    def fresh(self) -> Callable[[ir.Shape | None], ir.Shape | None]:
        names: dict[str, str] = {}

        def rename(m: re.Match[str]) -> str:
            if m.group(0) not in names:
                names[m.group(0)] = f"u{self.next}"
                self.next += 1
            return names[m.group(0)]

        def shape(s: ir.Shape | None) -> ir.Shape | None:
            if s is None:
                return None
            return ir.Shape(
                [ir.SymbolicDim(_UNBACKED.sub(rename, str(d))) if isinstance(d, ir.SymbolicDim) else d for d in s]
            )

        return shape


def _renamer(t: int, j: int) -> Callable[[str], str]:
    """`layers.{t}` -> `layers.{j}` in names, checkpoint sources and module scopes."""
    pattern = re.compile(rf"(?<=\blayers\.){t}(?!\d)")
    return lambda text: pattern.sub(str(j), text)


def _unique(name: str, names: set[str]) -> str:
    candidate, n = name, 0
    while candidate in names:
        n += 1
        candidate = f"{name}_{n}"
    names.add(candidate)
    return candidate


# --- comparing graphs -----------------------------------------------------------------------------------


def fingerprint(model: ir.Model) -> tuple[Counter[str], dict[str, str]]:
    """A graph's structure without its value and node names: (multiset of node keys, output name -> key).

    A node's key hashes its op, attributes, output types, module scope (its layer) and its inputs' keys.
    `Shape` of a graph input is keyed by the declared sizes it reads: which of the inputs that share a
    symbolic size a trace reads it from varies from trace to trace (an order inside torch.export).
    """
    graph = model.graph
    keys: dict[ir.Value, str] = {}
    for v in graph.inputs:
        keys[v] = _digest("input", v.name)
    for v in graph.initializers.values():
        c = v.const_value
        content = "placeholder" if c is None else hashlib.sha1(c.tobytes()).hexdigest()
        keys[v] = _digest("initializer", _source(v) or "", str(v.dtype), str(v.shape), content)
    nodes: Counter[str] = Counter()
    unbacked: dict[str, str] = {}

    def canonical(shape: ir.Shape | None) -> str:
        return _UNBACKED.sub(lambda m: unbacked.setdefault(m.group(0), f"u#{len(unbacked)}"), str(shape))

    for node in graph:
        ins = [_read_dims(node) or ("" if v is None else keys[v]) for v in node.inputs]
        attrs = sorted(f"{a.name}={a.value!r}" for a in node.attributes.values())
        scope = _scope(node.metadata_props.get("namespace", ""))
        base = _digest(node.domain, node.op_type, *attrs, scope, *ins)
        for i, out in enumerate(node.outputs):
            keys[out] = _digest(base, str(i), str(out.type), canonical(out.shape))
        nodes[base] += 1
    return nodes, {v.name or "": keys[v] for v in graph.outputs}


def _read_dims(node: ir.Node) -> str | None:
    """For `Shape`/`Size` of a graph input: the declared sizes it reads (not which input it reads them from)."""
    x = node.inputs[0] if node.inputs else None
    if node.op_type not in _SHAPE_OPS or node.domain != "" or x is None or not x.is_graph_input() or x.shape is None:
        return None
    dims = [str(d) for d in x.shape]
    if node.op_type == "Shape":
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        dims = dims[start:end]
    return _digest(node.op_type, str(x.dtype), *dims)


def _scope(namespace: str) -> str:
    """The module path of a dynamo namespace, without the FX node's own name (a per-trace counter)."""
    head, _, _ = namespace.rpartition("/")
    return head


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()

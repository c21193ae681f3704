"""What the engine builder needs to know about an ONNX file before TensorRT sees it.

Read from the graph alone (external weights stay on disk): the inputs with their named dynamic dims
(profiles are planned from those names), the precision of the float I/O (strongly typed builds take it
from the graph), the g2trt plugin nodes (checked before a backend that lacks them aborts on them) and,
when `manifest.json` sits beside the model, the model config (bounds the profiles by
max_position_embeddings).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import onnx

from export.errors import G2trtError
from trt_plugins import PLUGINS
from trt_plugins.spec import DOMAIN

DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
}


class OnnxInputError(G2trtError):
    """The ONNX file is missing, unreadable or not a graph g2trt can build."""


@dataclasses.dataclass(frozen=True)
class IoTensor:
    name: str
    elem_type: int
    dims: tuple[int | str, ...]  # ints are static, strings are named dynamic dims ("?" when unnamed)


@dataclasses.dataclass(frozen=True)
class OnnxInfo:
    path: Path
    inputs: tuple[IoTensor, ...]
    outputs: tuple[IoTensor, ...]
    dtype: str  # "fp32" | "fp16" | "bf16": the KV-cache / first float input's precision
    plugin_nodes: dict[str, int]  # plugin op_type -> count (g2trt domain or a registered plugin name)
    opset: int
    sha256: str  # of the .onnx file itself (weights in external data are not hashed)
    max_positions: int | None  # from manifest.json beside the model, if any
    weights: str | None = None  # quantized weights (export --quant): "int4" | "int8" | "fp8"; None: float

    @property
    def has_plugins(self) -> bool:
        return bool(self.plugin_nodes)

    def plugin_summary(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.plugin_nodes.items()))


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    shape = vi.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _max_positions(path: Path) -> int | None:
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        import json

        raw: dict[str, Any] = json.loads(manifest.read_text())
        value = raw.get("config", {}).get("max_position_embeddings")
        return int(value) if value else None
    except (ValueError, TypeError, OSError):
        return None  # a broken manifest does not block a build; the export verifier reports it


def inspect_onnx(path: str | Path) -> OnnxInfo:
    path = Path(path)
    if not path.is_file():
        raise OnnxInputError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / google.protobuf errors
        raise OnnxInputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(
        IoTensor(i.name, i.type.tensor_type.elem_type, _dims(i)) for i in graph.input if i.name not in initializers
    )
    outputs = tuple(IoTensor(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in graph.output)
    if not inputs:
        raise OnnxInputError(f"{path}: the graph has no inputs")
    floats = [t for t in inputs if t.elem_type in DTYPES] or [t for t in outputs if t.elem_type in DTYPES]
    kv = [t for t in floats if t.name.startswith("past_key_values.")]
    dtype = DTYPES[(kv or floats)[0].elem_type] if floats else "fp32"
    nodes = _all_nodes(graph) + [n for f in model.functions for n in f.node]
    plugins = collections.Counter(n.op_type for n in nodes if n.domain == DOMAIN or n.op_type in PLUGINS)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    weights = _quantized_weights(graph)
    return OnnxInfo(path, inputs, outputs, dtype, dict(plugins), opset, _sha256(path), _max_positions(path), weights)


_QUANTIZED = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT8: "int8"}


def _quantized_weights(graph: onnx.GraphProto) -> str | None:
    """The narrowest quantized weight type among the initializers (export/quantize.py writes one kind)."""
    found = {_QUANTIZED[i.data_type] for i in graph.initializer if i.data_type in _QUANTIZED}
    return next((kind for kind in ("int4", "fp8", "int8") if kind in found), None)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of the graph and of its subgraphs (If/Loop bodies)."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    nodes.extend(_all_nodes(g))
    return nodes

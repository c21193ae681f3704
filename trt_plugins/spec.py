"""The schema of a g2trt plugin op: one definition that graph passes, the onnxruntime reference ops,
the Triton kernels and the TensorRT registrations all import, so they can never drift apart.

An ONNX node for a plugin has `op_type = spec.name`, domain `spec.domain`, the spec's attributes, and
`plugin_version` / `plugin_namespace` attributes, which TensorRT's ONNX parser uses to find the
creator in its plugin registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from export.errors import G2trtError

NAMESPACE = "g2trt"
DOMAIN = "g2trt"  # ONNX domain of plugin nodes (TensorRT's parser falls back to its plugin registry by op_type)
DTYPES = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class Attr:
    name: str
    type: Literal["int", "float"]
    doc: str
    default: float | int | None = None


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[Attr, ...]
    doc: str
    version: str = "1"
    namespace: str = NAMESPACE
    domain: str = DOMAIN
    dtypes: tuple[str, ...] = DTYPES

    def attributes(self, **values: Any) -> dict[str, Any]:
        """Validated node attributes (spec attributes plus plugin_version / plugin_namespace)."""
        out: dict[str, Any] = {}
        known = {a.name: a for a in self.attrs}
        unknown = set(values) - set(known)
        if unknown:
            raise G2trtError(f"plugin {self.name}: unknown attribute(s) {sorted(unknown)}")
        for a in self.attrs:
            v = values.get(a.name, a.default)
            if v is None:
                raise G2trtError(f"plugin {self.name}: attribute {a.name!r} is required")
            out[a.name] = int(v) if a.type == "int" else float(v)
        out["plugin_version"] = self.version
        out["plugin_namespace"] = self.namespace
        return out

    def parse(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """Spec attributes of a node (drops plugin_version / plugin_namespace / TensorRT extras)."""
        names = {a.name for a in self.attrs}
        return self.attributes(**{k: v for k, v in attributes.items() if k in names})

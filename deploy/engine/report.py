"""What `g2trt build` reports: the engine's identity (EngineMeta) plus how the build went.

Written into the engine's side file (`ENGINE.json`, key "build") and printed as a table. Layers are
counted by TensorRT layer type from the engine inspector where the engine can be deserialized (the
full TensorRT on its GPU: layers after fusion), otherwise from the parsed network definition (what
TensorRT was given, before fusion: the only view an ahead-of-time TensorRT-RTX build without a GPU
has); `layers_source` says which.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deploy.engine.backend import LABELS
from deploy.engine.gpu_info import describe_sm
from deploy.engine.meta import EngineMeta


@dataclasses.dataclass(frozen=True)
class BuildReport:
    engine: Path
    meta_file: Path
    meta: EngineMeta
    ranges: dict[str, dict[str, list[int]]]  # profile -> dim (batch/seq/past) -> [min, opt, max]
    layers: dict[str, int]  # layer type -> count
    layers_source: str  # "network" (before fusion) | "engine" (inspector, after fusion)
    build_seconds: float
    optimization_level: int
    notes: tuple[str, ...] = ()  # e.g. "timing cache ignored: ..."
    warnings: tuple[str, ...] = ()  # TensorRT's own warnings during parse and build

    @property
    def layers_total(self) -> int:
        return sum(self.layers.values())

    def build_json(self) -> dict[str, Any]:
        """The "build" entry of the side file (the meta fields sit beside it)."""
        return {
            "layers": dict(sorted(self.layers.items(), key=lambda kv: (-kv[1], kv[0]))),
            "layers_total": self.layers_total,
            "layers_source": self.layers_source,
            "ranges": self.ranges,
            "build_seconds": round(self.build_seconds, 3),
            "optimization_level": self.optimization_level,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": str(self.engine),
            "meta_file": str(self.meta_file),
            **self.meta.to_json(),
            "build": self.build_json(),
        }

    def rows(self) -> list[tuple[str, str]]:
        from deploy.console import human_bytes

        m = self.meta
        top = sorted(self.layers.items(), key=lambda kv: (-kv[1], kv[0]))
        layer_text = ", ".join(f"{k} {v}" for k, v in top[:8]) + (
            f", … ({len(top) - 8} more types)" if len(top) > 8 else ""
        )
        rows = [
            ("engine", f"{self.engine} ({human_bytes(m.engine_bytes)})"),
            ("built by", f"{LABELS.get(m.backend, m.backend)} {m.trt_version}"),
            ("target", ", ".join(describe_sm(s) for s in m.target_sms)),
            ("precision", f"{m.dtype} (strongly typed, from the ONNX)"),
            ("onnx", f"{m.onnx} (sha256 {m.onnx_sha256[:12]}…)"),
        ]
        for name, dims in self.ranges.items():
            rows.append((f"profile {name}", ", ".join(f"{k} {v[0]}..{v[2]} (opt {v[1]})" for k, v in dims.items())))
        rows += [
            ("plugins", ", ".join(f"{k} x{v}" for k, v in sorted(m.plugins.items())) or "none"),
            (f"layers ({self.layers_source})", f"{self.layers_total}: {layer_text}"),
            ("build time", f"{self.build_seconds:.1f} s (optimization level {self.optimization_level})"),
            ("side file", str(self.meta_file)),
        ]
        rows += [("note", n) for n in self.notes]
        if self.warnings:
            rows.append(("TensorRT warnings", f"{len(self.warnings)} (see {self.meta_file.name}: build.warnings)"))
        return rows

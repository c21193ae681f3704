"""What a pass did, and what `optimize` did: counts a reviewer can check against the model's config."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rejection:
    anchor: str  # the node the matcher started from
    label: str | None  # layer/site it would have been, when known
    reason: str


@dataclasses.dataclass(frozen=True)
class PassReport:
    name: str
    sites: list[str]  # one label per site rewritten ("layer 3 attn", "logits", "#2" when unknown)
    nodes_before: int
    nodes_after: int
    seconds: float
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    expected: list[str] | None = None  # labels the config implies; None: the pass has no expectation

    @property
    def count(self) -> int:
        return len(self.sites)

    @property
    def missing(self) -> list[str]:
        if self.expected is None:
            return []
        have = set(self.sites)
        if any(s.startswith("#") for s in self.sites):  # unlabeled graph: only counts can be compared
            return (
                [f"{len(self.expected) - self.count} of {len(self.expected)}"]
                if self.count < len(self.expected)
                else []
            )
        return [e for e in self.expected if e not in have]

    def reason_for(self, label: str) -> str | None:
        return next((r.reason for r in self.rejected if r.label == label), None)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["count"] = self.count
        d["rejected"] = [dataclasses.asdict(r) for r in self.rejected[:50]]
        d["rejected_total"] = len(self.rejected)
        return d


@dataclasses.dataclass(frozen=True)
class OptimizeReport:
    target: str
    model_path: str
    source_model: str
    passes: list[PassReport]
    nodes_before: int
    nodes_after: int
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model_path,
            "source_model": self.source_model,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 3),
            "passes": [p.to_json() for p in self.passes],
            "op_counts_before": self.op_counts_before,
            "op_counts_after": self.op_counts_after,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(pass, sites, expected, nodes before -> after) per pass."""
        return [
            (
                p.name,
                str(p.count),
                "-" if p.expected is None else str(len(p.expected)),
                f"{p.nodes_before} -> {p.nodes_after}",
            )
            for p in self.passes
        ]

    def text(self) -> str:
        """The pass table as plain text (written beside the model as passes.txt)."""
        header = ("pass", "sites", "expected", "nodes")
        rows = [header, *self.rows(), ("total", "", "", f"{self.nodes_before} -> {self.nodes_after}")]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"g2trt optimize --target {self.target}: {self.source_model} -> {self.model_path}", ""]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        lines.append("ops after: " + ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts_after.items())))
        return "\n".join(lines) + "\n"


def op_counts(op_types: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in op_types:
        out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))

"""What `g2trt bench` reports: the machine it ran on, the tables (terminal and Markdown), the JSON and the plot.

Kept apart from deploy/bench/run.py (which runs the trials) so reading a result never starts a backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploy.bench.run import BenchResult

_VERSIONED = ("torch", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "tensorrt", "tensorrt_rtx_cu13_bindings")


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_results(result: BenchResult, out: Path, stem: str = "bench") -> dict[str, Path]:
    """`stem`.json and `stem`.png (and `stem`.md, the table as Markdown) under `out`, each written atomically."""
    from deploy.bench.plot import plot
    from export.atomic import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    with atomic_file(paths["md"]) as tmp:
        tmp.write_text(markdown(result))
    with atomic_file(paths["png"]) as tmp:
        plot(result, tmp)
    return paths


COLUMNS = (
    "backend",
    "batch",
    "prompt",
    "TTFT ms p50",
    "p90",
    "decode tok/s p50",
    "step ms p50",
    "p90",
    "KV MiB",
    "TTFT x",
    "decode x",
    "tokens = ",
)


def table_rows(result: BenchResult) -> list[list[str]]:
    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}g}"

    rows = []
    for r in result.rows:
        agree = "-" if r.agree is None else f"{r.agree:.0%} {r.agree_with}"
        rows.append(
            [
                r.backend,
                str(r.batch),
                str(r.prompt),
                f(r.ttft_ms_p50),
                f(r.ttft_ms_p90),
                f(r.decode_tok_s_p50, 4),
                f(r.step_ms_p50),
                f(r.step_ms_p90),
                f(r.kv_mib),
                f(r.ttft_speedup),
                f(r.decode_speedup),
                agree,
            ]
        )
    return rows


def backend_rows(result: BenchResult) -> list[list[str]]:
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return [
        [
            b.backend,
            b.status,
            mib(b.base_rss_mib),
            mib(b.peak_rss_mib),
            mib(b.peak_gpu_mib),
            "-" if b.load_s is None else f"{b.load_s:.1f}",
            b.reason or b.artifact,
        ]
        for b in result.backends
    ]


BACKEND_COLUMNS = ("backend", "status", "base RSS MiB", "peak RSS MiB", "peak GPU MiB", "load s", "reason / artifact")


def markdown(result: BenchResult) -> str:
    s = result.settings
    lines = [
        f"# g2trt bench: {result.model}",
        "",
        f"{result.machine.get('cpu')}, {result.machine.get('cores')} cores"
        + (f", GPU {result.machine['gpu']}" if result.machine.get("gpu") else ", no GPU")
        + f"; {s.dtype}, {s.new_tokens} new tokens, {s.warmup} warm-up + {s.repeats} timed rounds, "
        f"threads {s.threads or result.machine.get('cores')}; speedups (x) against {s.baseline}.",
        "",
        _md_table(COLUMNS, table_rows(result)),
        "",
        _md_table(BACKEND_COLUMNS, backend_rows(result)),
        "",
    ]
    return "\n".join(lines)


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_tables(result: BenchResult, paths: dict[str, Path] | None = None) -> None:
    """The results table and the per-backend table on stdout; why a backend did not run, one line each."""
    from deploy import console as ui

    title = f"g2trt bench: {result.model} (x = speedup against {result.settings.baseline})"
    ui.out.print(ui.table(title, COLUMNS, table_rows(result)))
    ui.out.print(ui.table("backends", BACKEND_COLUMNS[:-1], [r[:-1] for r in backend_rows(result)]))
    for b in result.backends:
        if b.status != "ok":
            ui.out.print(f"{b.backend} {b.status}: {b.reason}", markup=False, highlight=False)
    if paths:
        ui.out.print("results: " + ", ".join(str(p) for p in paths.values()), markup=False, highlight=False)

"""The benchmark as a PNG: TTFT and decode throughput per backend, one group of bars per (batch, prompt).

Bars are medians; whiskers reach the p90 (TTFT). Skipped backends are named under the title so a
missing bar is never mistaken for a slow one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: Any, path: Path) -> None:
    """Write `result` (a deploy.bench.run.BenchResult) as a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result.rows
    configs = sorted({(r.batch, r.prompt) for r in rows})
    backends = [b for b in result.settings.backends if any(r.backend == b for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(configs) + 4), 4.2), dpi=120)
    width = 0.8 / max(1, len(backends))
    x = np.arange(len(configs))
    for i, backend in enumerate(backends):
        by = {(r.batch, r.prompt): r for r in rows if r.backend == backend}
        ttft = [by[c].ttft_ms_p50 if c in by else np.nan for c in configs]
        ttft_hi = [by[c].ttft_ms_p90 - by[c].ttft_ms_p50 if c in by else 0 for c in configs]
        tok = [by[c].decode_tok_s_p50 if c in by else np.nan for c in configs]
        pos = x - 0.4 + width * (i + 0.5)
        axes[0].bar(pos, ttft, width, yerr=[np.zeros(len(configs)), ttft_hi], capsize=2, label=backend)
        axes[1].bar(pos, tok, width, label=backend)
    labels = [f"b{b} p{p}" for b, p in configs]
    for ax, title in zip(axes, ("time to first token, ms (p50, whisker p90)", "decode tokens/s (p50)"), strict=True):
        ax.set_xticks(x, labels)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    handles, names = axes[1].get_legend_handles_labels()  # below the plots: never over a bar
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    s = result.settings
    skipped = [f"{b.backend} ({b.status})" for b in result.backends if b.status != "ok"]
    title = f"{result.model}: {s.new_tokens} new tokens, {s.dtype}, {result.machine.get('cores')} cores"
    if result.machine.get("gpu"):
        title += f", {result.machine['gpu']}"
    if skipped:
        title += "\nnot run: " + ", ".join(skipped)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)

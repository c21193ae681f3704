"""Rich output shared by the CLI commands: progress while weights stream, summary tables after."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)  # progress and tables on stderr; stdout stays clean for piping
out = Console()


@contextlib.contextmanager
def weight_progress(total_bytes: int, label: str) -> Iterator[Callable[[str, int], None]]:
    """A bar over bytes written; yields the callback `export_onnx` calls per tensor."""
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total_bytes)

        def advance(name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, description=f"{label}: {name}")

        yield advance


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    with console.status(message):
        yield


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A table; all-empty column names give a key/value table without a header row."""
    t = Table(title=title, title_justify="left", show_header=any(columns))
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"

"""Atomic outputs: everything is written under a temporary name and renamed into place at the end.

A failure (bad input, Ctrl-C, out of disk) leaves the destination as it was: no half-written model
beside an old manifest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside `final`; on success its files replace those in `final`.

    Files are moved one by one with `os.replace` (atomic per file, same filesystem); the files that
    reference others (`*.onnx`, then `manifest.json`) move last so a reader never sees a model
    whose data file is missing.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        final.mkdir(exist_ok=True)
        order = sorted(tmp.iterdir(), key=lambda p: (p.suffix == ".onnx", p.name == "manifest.json", p.name))
        for item in order:
            target = final / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)

"""Pause Python's cyclic garbage collector where a phase makes many objects and little garbage."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic collection inside; the collector's previous state after.

    For importing torch & co. and tracing (export.onnx_export): each full collection walks every live
    object (~0.5 M after the imports), yet nearly all of them outlive the phase. `g2trt export` of tiny
    spends ~0.4 s of collections in its imports and ~1 s in the trace without this. Garbage made inside is
    left for the first collection after, so a phase that pauses the collector must be bounded in what it
    allocates.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

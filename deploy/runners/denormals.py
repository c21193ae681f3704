"""Denormal floats flushed to zero while onnxruntime runs a g2trt graph, on every thread that computes.

Why: a masked attention score (the mask adds the dtype's lowest value) makes softmax's exp underflow to a
denormal, and x86 cores handle denormal arithmetic in microcode. onnxruntime's CPU Softmax over a causal
[1, 8, 256, 256] block takes 0.28x the time flushed (benchmarks/inplace/results_denormals.md), and the
standard-op attention of every prompt and of every ring-buffer decode step runs one.
Flushing changes nothing a Gemma logit can show: the values lost are below 1.2e-38 (fp32's smallest
normal), weights of keys the mask already removed (tests/deploy/test_denormals.py checks the logits).

Two kinds of thread compute a run, and each needs the mode (FTZ and DAZ in x86's MXCSR) set:
- the session's intra-op pool threads: onnxruntime's `session.set_denormal_as_zero` entry;
- the thread that calls `run`, which onnxruntime puts to work too. onnxruntime sets the mode on the
  thread that creates the session, for good, and not on any other; a runner stepped from another thread
  (a server's) would run half its work unflushed. So the session is created under `kept_mode()`, which
  undoes that, and each run is inside `Flushed()`: the runner leaves no thread's floating-point mode
  changed, its own or the caller's.

torch (a g2trt dependency, imported only when the mode changes) sets it: `torch.set_flush_denormal`, a
no-op returning False where the CPU has no such mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnxruntime_genai's benchmark children import this module and load no onnxruntime
    import onnxruntime as ort

CONFIG_KEY = "session.set_denormal_as_zero"
_TINY = np.float32(1e-38)  # a normal fp32 whose half is a denormal
_HALF = np.float32(0.5)


def flushing() -> bool:
    """Whether this thread flushes denormal results to zero now (probed with one fp32 product)."""
    return bool(_TINY * _HALF == 0)


def configure(so: ort.SessionOptions) -> ort.SessionOptions:
    """`so` with its sessions' pool threads flushing denormals."""
    so.add_session_config_entry(CONFIG_KEY, "1")
    return so


@contextlib.contextmanager
def kept_mode() -> Iterator[None]:
    """Leave this thread's mode as it was around what sets it (onnxruntime's session creation)."""
    was = flushing()
    try:
        yield
    finally:
        if flushing() != was:
            _set(was)


def flush() -> bool:
    """Flush on this thread; returns whether `restore()` must undo it (False if it was already on)."""
    if flushing():
        return False
    return _set(True)


def restore(undo: bool) -> None:
    """Undo `flush()` when it changed the mode."""
    if undo:
        _set(False)


class Flushed:
    """`with Flushed():` this thread flushes denormals inside the block and is as it was after it
    (`Flushed(False)`: nothing changes). A class, not a generator: a decode step enters one."""

    __slots__ = ("on", "undo")

    def __init__(self, on: bool = True) -> None:
        self.on, self.undo = on, False

    def __enter__(self) -> Flushed:
        self.undo = flush() if self.on else False
        return self

    def __exit__(self, *exc: object) -> None:
        restore(self.undo)


def _set(on: bool) -> bool:
    import torch

    return bool(torch.set_flush_denormal(on))

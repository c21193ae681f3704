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

On x86-64 Linux the mode is written through the C library's `fegetmode` / `fesetmode` (C23, glibc
2.25+), whose `femode_t` holds MXCSR there, so an onnxruntime-only process (a serving instance, `generate
--backend ort`) never imports torch (192 MiB and 1.2 s measured). The first use checks that the write
shows in an fp32 product and falls back to torch's `set_flush_denormal` where it does not, or on another
platform (a no-op returning False where the CPU has no such mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import sys
from collections.abc import Callable, Iterator
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
    global _setter
    if _setter is None:
        _setter = _mxcsr_setter() or _torch_setter
    return _setter(on)


_FTZ_DAZ = 0x8040  # MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6)
_setter: Callable[[bool], bool] | None = None


def _torch_setter(on: bool) -> bool:
    import torch

    return bool(torch.set_flush_denormal(on))


def _mxcsr_setter() -> Callable[[bool], bool] | None:
    """A setter through glibc's fegetmode/fesetmode (x86-64: femode_t is the x87 control word, two bytes
    reserved, then MXCSR), checked once against an fp32 product; None where it is unavailable or does
    not take."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        get, put = libm.fegetmode, libm.fesetmode
    except (OSError, AttributeError):
        return None

    mode_t = ctypes.c_uint32 * 2  # sizeof(femode_t) == 8 on x86-64 glibc; MXCSR is the second word

    def setter(on: bool) -> bool:
        mode = mode_t()
        if get(mode) != 0:
            raise OSError("fegetmode failed")
        mode[1] = mode[1] | _FTZ_DAZ if on else mode[1] & ~_FTZ_DAZ
        if put(mode) != 0:
            raise OSError("fesetmode failed")
        return True

    was = flushing()
    try:
        setter(not was)
        took = flushing() != was
        setter(was)
    except OSError:
        return None
    return setter if took and flushing() == was else None

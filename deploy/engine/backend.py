"""One adapter over the two TensorRT flavours g2trt builds with: the full `tensorrt` and TensorRT-RTX.

Both expose the same builder API (Builder, STRONGLY_TYPED networks, OnnxParser, optimization
profiles, IStreamWriter); they differ in where an engine may run. TensorRT-RTX compiles ahead of time
for compute capabilities named in the builder config (no GPU needed); the full TensorRT builds for the
GPU it runs on. Everything else in `deploy.engine.build` is written once against the shared API.

Modules are imported lazily: the CLI works without either, and a missing one is a one-line error that
says what to `pip install`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from deploy.engine.gpu_info import describe_sm, local_sm
from export.errors import G2trtError
from export.gc_pause import gc_paused

BackendName = Literal["tensorrt", "tensorrt-rtx"]
BACKENDS: tuple[BackendName, ...] = ("tensorrt", "tensorrt-rtx")
MODULES: dict[BackendName, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
LABELS: dict[str, str] = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
INSTALL: dict[BackendName, str] = {
    "tensorrt": "pip install 'tensorrt>=10.15' (needs an NVIDIA GPU and driver)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs",
}
MIN_TENSORRT = (10, 15)  # ONNX RMSNormalization / RotaryEmbedding / Attention import
DEFAULT_RTX_SM = 89  # Ada (L4, L40S, RTX 40xx): the ahead-of-time target when this machine has no GPU


class BackendMissingError(G2trtError):
    """The requested TensorRT flavour is not importable."""


class UnsupportedTargetError(G2trtError):
    """A compute capability the backend cannot build for."""


def parse_sm(text: str | int) -> int:
    """`89`, `8.9`, `sm_89`, `SM89` -> 89 (the spellings nvidia-smi, nvcc and TensorRT use)."""
    raw = str(text).strip().lower().removeprefix("sm").lstrip("_")
    if re.fullmatch(r"\d{1,2}\.\d", raw):
        raw = raw.replace(".", "")
    if not re.fullmatch(r"\d{2,3}", raw):
        raise UnsupportedTargetError(f"--sm {text!r}: expected a compute capability such as 80, 8.9 or sm_89")
    return int(raw)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


@dataclasses.dataclass(frozen=True)
class TrtBackend:
    name: BackendName
    trt: Any  # the imported module: `tensorrt` or `tensorrt_rtx_bindings` (same API, typed as the former)
    version: str

    @property
    def label(self) -> str:
        """`TensorRT-RTX 1.7.1.116`, as messages and reports print it."""
        return f"{LABELS[self.name]} {self.version}"

    @property
    def ahead_of_time(self) -> bool:
        return self.name == "tensorrt-rtx"

    def buildable_sms(self) -> tuple[int, ...]:
        """SMs this backend can target here: RTX's ComputeCapability list, or the local GPU."""
        if self.ahead_of_time:
            names = self.trt.ComputeCapability.__members__
            return tuple(sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"SM(\d+)", n))))
        sm = local_sm()
        return (sm,) if sm is not None else ()

    def resolve_targets(self, requested: Sequence[int]) -> tuple[int, ...]:
        """The SMs to build for; `requested` empty means the local GPU (RTX: SM 89 without one)."""
        buildable = self.buildable_sms()
        if not self.ahead_of_time:
            if not buildable:
                raise UnsupportedTargetError(
                    f"{self.label} builds for the GPU it runs on, and this machine has none: "
                    "use --backend tensorrt-rtx to build ahead of time for a chosen --sm"
                )
            bad = [sm for sm in requested if sm != buildable[0]]
            if bad:
                raise UnsupportedTargetError(
                    f"{self.label} builds only for this machine's GPU, {describe_sm(buildable[0])}; "
                    f"--sm {bad[0]} needs --backend tensorrt-rtx (ahead of time) or a build on that GPU"
                )
            return buildable
        if not requested:
            sm = local_sm()
            if sm is not None and sm not in buildable:
                raise UnsupportedTargetError(
                    f"this GPU is {describe_sm(sm)}, which {self.label} cannot build for: pass --sm to build for "
                    "another GPU, or use --backend tensorrt"
                )
            requested = [sm if sm is not None else DEFAULT_RTX_SM]
        bad = sorted({sm for sm in requested if sm not in buildable})
        if bad:
            hint = " (Hopper: use the full TensorRT builder, --backend tensorrt, on the GPU)" if 90 in bad else ""
            raise UnsupportedTargetError(
                f"{self.label} cannot build for {describe_sm(bad[0])}; it targets SM "
                f"{', '.join(map(str, buildable))}{hint}"
            )
        return tuple(sorted(set(requested)))

    def apply_targets(self, config: Any, sms: Sequence[int]) -> None:
        """Tell the builder config what to compile for (RTX only; the full TensorRT uses the local GPU)."""
        if not self.ahead_of_time:
            return
        config.num_compute_capabilities = len(sms)
        for i, sm in enumerate(sms):
            if not config.set_compute_capability(getattr(self.trt.ComputeCapability, f"SM{sm}"), i):
                raise UnsupportedTargetError(f"{self.label} refused compute capability SM {sm}")

    def logger(self, echo: bool = False) -> Any:
        """An ILogger that keeps warnings and errors (for one-line failures and the report)."""
        return make_logger(self.trt, echo)


def import_backend(name: BackendName) -> TrtBackend:
    """Import one flavour; BackendMissingError (one line, what to install) when it is not there."""
    if name not in BACKENDS:
        raise G2trtError(f"unknown backend {name!r}; choose auto, {' or '.join(BACKENDS)}")
    try:
        module = importlib.import_module(MODULES[name])
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its shared libraries are not
        raise BackendMissingError(f"{LABELS[name]} is not installed ({e}): {INSTALL[name]}") from None
    if not hasattr(module, "Builder"):  # e.g. `tensorrt-stubs` alone leaves an empty `tensorrt` namespace package
        raise BackendMissingError(f"{LABELS[name]} is not installed (only its type stubs are): {INSTALL[name]}")
    version = str(getattr(module, "__version__", "0"))
    if name == "tensorrt" and version_tuple(version) < MIN_TENSORRT:
        raise BackendMissingError(
            f"TensorRT {version} is too old for g2trt (needs >= {'.'.join(map(str, MIN_TENSORRT))}): "
            f"{INSTALL['tensorrt']}"
        )
    return TrtBackend(name, module, version)


def resolve_backend(choice: str = "auto") -> TrtBackend:
    """`auto`: the full TensorRT where importable and a GPU is there to build on, else TensorRT-RTX."""
    if choice != "auto":
        return import_backend(choice)  # type: ignore[arg-type]
    full: TrtBackend | None = None
    try:
        full = import_backend("tensorrt")
        if local_sm() is not None:
            return full
    except BackendMissingError:
        pass
    try:
        return import_backend("tensorrt-rtx")
    except BackendMissingError:
        if full is not None:
            return full  # its build then says it needs a GPU, and what to install instead
        raise BackendMissingError(
            f"no TensorRT is installed: {INSTALL['tensorrt-rtx']} (ahead-of-time builds, no GPU needed), "
            f"or {INSTALL['tensorrt']}"
        ) from None


@contextlib.contextmanager
def no_gc_inside_tensorrt() -> Iterator[None]:
    """No automatic garbage collection while TensorRT may call back into Python; one collection after.

    TensorRT calls the Python logger while holding its own locks (`trt.Builder(logger)` does). A collection
    triggered by an allocation in that callback can free an unreachable TensorRT object from an earlier build,
    whose destructor takes the same lock: the process deadlocks (seen with TensorRT-RTX 1.7.1 in CI). With the
    collector off during TensorRT work and run afterwards, such objects are freed outside TensorRT's locks.
    """
    try:
        with gc_paused():
            yield
    finally:
        gc.collect()


def make_logger(trt: Any, echo: bool = False) -> Any:
    """A `trt.ILogger` subclass instance (built per module: the two flavours have distinct base classes)."""
    import sys

    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(msg)
            elif level == severity.WARNING:
                self.warnings.append(msg)
            if echo and level in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING, severity.INFO):
                print(f"[{LABELS_BY_MODULE.get(trt.__name__, 'TRT')}] {msg}", file=sys.stderr)

    return _Logger()


LABELS_BY_MODULE = {MODULES[k]: LABELS[k] for k in BACKENDS}

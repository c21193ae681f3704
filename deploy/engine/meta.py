"""The side file `ENGINE.json` that lets g2trt refuse an engine it cannot run, with a clear message.

A TensorRT engine only deserializes in the TensorRT flavour and version that built it, on the GPUs it
was compiled for; otherwise TensorRT fails deep inside deserialization (or, for a truncated file,
worse). The side file records what the engine needs, and `check_engine_compatible` compares it with
the runtime before any bytes reach TensorRT.

A side file rather than a header in the engine: the engine stays a plain TensorRT plan that trtexec, the
C++ runtime and onnxruntime's TensorRT EP load as is. The engine's size, first bytes and sha256 are
in the side file, so a corrupt, truncated or swapped engine is caught too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from deploy.engine.backend import LABELS, version_tuple
from deploy.engine.gpu_info import describe_sm
from export.atomic import atomic_file
from export.errors import G2trtError

FORMAT = "g2trt-engine/1"
_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")  # one line per shape in the side file


class EngineMetaError(G2trtError):
    """The engine or its side file is missing or unreadable."""


class CorruptEngineError(EngineMetaError):
    """The engine bytes do not match what g2trt build wrote."""


class IncompatibleEngineError(EngineMetaError):
    """A sound engine built for another TensorRT flavour / version or another GPU."""


@dataclasses.dataclass(frozen=True)
class EngineMeta:
    backend: str  # "tensorrt" | "tensorrt-rtx"
    trt_version: str
    target_sms: tuple[int, ...]
    dtype: str
    onnx: str
    onnx_sha256: str
    profiles: tuple[dict[str, Any], ...]  # Profile.to_json(): name + input -> [min, opt, max]
    plugins: dict[str, int]
    engine_bytes: int
    engine_sha256: str
    engine_magic: str  # hex of the first 4 bytes (TensorRT-RTX plans start with b"vtrt")
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_sms"] = list(self.target_sms)
        d["profiles"] = list(self.profiles)
        return d

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> EngineMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        values["target_sms"] = tuple(int(s) for s in values["target_sms"])
        values["profiles"] = tuple(values["profiles"])
        return cls(**values)

    def profile_index(self, name: str) -> int:
        """Index of the profile named `name` ("prefill" / "decode") for set_optimization_profile_async."""
        for i, p in enumerate(self.profiles):
            if p["name"] == name:
                return i
        raise EngineMetaError(f"engine has no {name!r} optimization profile (has {[p['name'] for p in self.profiles]})")


def meta_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def file_digest(path: Path) -> tuple[int, str, str]:
    """(size, sha256 hex, first 4 bytes hex) of a file, read in chunks (engines reach gigabytes)."""
    h = hashlib.sha256()
    size, head = 0, b""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            if not head:
                head = chunk[:4]
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest(), head.hex()


def write_engine_meta(engine_path: str | Path, meta: EngineMeta, extra: dict[str, Any] | None = None) -> Path:
    """Write `ENGINE.json` atomically: the meta fields, plus `extra` (the build report) beside them."""
    path = meta_path(engine_path)
    with atomic_file(path) as tmp:
        text = json.dumps({**meta.to_json(), **(extra or {})}, indent=2)
        tmp.write_text(_INT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n")
    return path


def load_engine_meta(engine_path: str | Path) -> EngineMeta:
    engine_path = Path(engine_path)
    path = meta_path(engine_path)
    if not engine_path.is_file():
        raise EngineMetaError(f"{engine_path}: no such engine file")
    if not path.is_file():
        raise EngineMetaError(
            f"{engine_path}: no side file {path.name}, so g2trt cannot tell which TensorRT and GPU it was built "
            "for; rebuild it with `g2trt build`"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        return EngineMeta.from_json(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptEngineError(f"{path}: not a g2trt engine side file ({e}); rebuild the engine") from None


def check_engine_compatible(
    engine_path: str | Path,
    runtime_version: str,
    device_sm: int | None,
    backend: str | None = None,
    verify_hash: bool = True,
) -> EngineMeta:
    """Refuse, with one line saying why and what to do, an engine this runtime and GPU cannot run.

    `runtime_version` is the TensorRT (or TensorRT-RTX) version that will deserialize the engine,
    `backend` its flavour ("tensorrt" / "tensorrt-rtx"; None skips that check), `device_sm` the GPU's
    SM (None skips the GPU check). Versions must agree on major.minor.patch. `verify_hash` re-hashes
    the engine (seconds for multi-GB engines); size and leading bytes are always checked.
    """
    engine_path = Path(engine_path)
    meta = load_engine_meta(engine_path)
    size = engine_path.stat().st_size
    if size != meta.engine_bytes:
        raise CorruptEngineError(
            f"{engine_path}: corrupt or truncated engine ({size} bytes, {meta_path(engine_path).name} says "
            f"{meta.engine_bytes}); rebuild it with `g2trt build`"
        )
    with engine_path.open("rb") as f:
        head = f.read(4).hex()
    if head != meta.engine_magic:
        raise CorruptEngineError(f"{engine_path}: corrupt engine (leading bytes {head}, expected {meta.engine_magic})")
    if verify_hash:
        _, digest, _ = file_digest(engine_path)
        if digest != meta.engine_sha256:
            raise CorruptEngineError(
                f"{engine_path}: corrupt or replaced engine (sha256 differs from {meta_path(engine_path).name}); "
                "rebuild it with `g2trt build`"
            )
    built = f"{LABELS.get(meta.backend, meta.backend)} {meta.trt_version}"
    if backend is not None and backend != meta.backend:
        raise IncompatibleEngineError(
            f"{engine_path}: built by {built}; it cannot run on {LABELS.get(backend, backend)}"
            f" (rebuild with --backend {backend})"
        )
    if version_tuple(runtime_version) != version_tuple(meta.trt_version):
        runtime = LABELS.get(backend or meta.backend, meta.backend)
        raise IncompatibleEngineError(
            f"{engine_path}: built by {built}, this runtime is {runtime} {runtime_version}; "
            "engines only load in the version that built them: rebuild it with `g2trt build`"
        )
    if device_sm is not None and device_sm not in meta.target_sms:
        targets = ", ".join(describe_sm(s) for s in meta.target_sms)
        raise IncompatibleEngineError(
            f"{engine_path}: built for {targets}; this GPU is {describe_sm(device_sm)}: rebuild with --sm {device_sm}"
        )
    return meta


def read_checked_engine(engine_path: str | Path, backend: Any, device_sm: int | None) -> tuple[bytes, EngineMeta]:
    """For runners: check against a `deploy.engine.backend.TrtBackend`, then return the bytes to deserialize."""
    meta = check_engine_compatible(engine_path, backend.version, device_sm, backend.name, verify_hash=False)
    data = Path(engine_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.engine_sha256:
        raise CorruptEngineError(
            f"{engine_path}: corrupt or replaced engine (sha256 differs from {meta_path(engine_path).name}); "
            "rebuild it with `g2trt build`"
        )
    return data, meta

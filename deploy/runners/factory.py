"""What a MODEL argument is (checkpoint, ONNX, engine, or none: a random preset) and the runner for a backend.

`g2trt generate` and `g2trt bench` accept any of them; a backend that needs a form the user did not
give (onnxruntime from a checkpoint) gets it made in a work directory, or a one-line error says what
to pass (TensorRT needs an engine from `g2trt build`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from deploy.runners.base import InplaceRunner, Runner
from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import manifest_config, read_manifest

if TYPE_CHECKING:  # export.weights imports torch: an onnxruntime-only process never needs it
    from export.weights import WeightSource

BACKENDS = ("torch", "ort", "trt")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
ModelKind = Literal["preset", "checkpoint", "onnx", "engine"]


class ModelError(G2trtError, ValueError):
    """A MODEL argument that is none of the forms g2trt runs, or a backend it cannot feed."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    kind: ModelKind
    path: Path | None  # checkpoint dir, model.onnx or engine file; None for a preset
    config: Gemma2Config
    preset: str = "tiny"
    seed: int = 0

    def weights(self) -> WeightSource:
        from export.weights import open_weights

        if self.kind not in ("preset", "checkpoint"):
            raise ModelError(f"{self.path}: the torch backend needs a checkpoint directory (or no MODEL)")
        return open_weights(self.path, self.preset, self.seed)

    @property
    def directory(self) -> Path | None:
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent


def check_backend(backend: str, choices: tuple[str, ...] = BACKENDS) -> str:
    if backend not in choices:
        raise ModelError(f"unknown backend {backend!r}; choose from {', '.join(choices)}")
    return backend


def resolve_model(model: str | Path | None, preset: str = "tiny", seed: int = 0) -> ModelRef:
    """Classify `model`: a HF checkpoint dir, an ONNX file (or dir with model.onnx), an engine, or None."""
    if model is None:
        from export.config import preset as get_preset

        return ModelRef("preset", None, get_preset(preset), preset, seed)
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{path}: not found")
    if path.is_dir():
        if (path / "config.json").is_file():
            from export.weights import open_weights

            return ModelRef("checkpoint", path, open_weights(path).config, preset, seed)
        if (path / "model.onnx").is_file():
            path = path / "model.onnx"
        else:
            engines = sorted(p for p in path.iterdir() if p.suffix in ENGINE_SUFFIXES)
            if len(engines) != 1:
                raise ModelError(
                    f"{path}: not a checkpoint (config.json), ONNX (model.onnx) or engine directory"
                    + (f" ({len(engines)} engines; name one)" if engines else "")
                )
            path = engines[0]
    if path.suffix == ".onnx":
        return ModelRef("onnx", path, manifest_config(read_manifest(path)), preset, seed)
    if path.suffix in ENGINE_SUFFIXES:
        return ModelRef("engine", path, engine_config(path), preset, seed)
    suffixes = ", ".join(ENGINE_SUFFIXES)
    raise ModelError(f"{path}: not a checkpoint directory, .onnx model or TensorRT engine ({suffixes})")


def engine_config(engine: Path) -> Gemma2Config:
    """The Gemma 2 config of an engine: the manifest of the ONNX its side file names, else one beside it."""
    from deploy.engine.meta import load_engine_meta

    meta = load_engine_meta(engine)
    for candidate in (Path(meta.onnx), engine):
        try:
            return manifest_config(read_manifest(candidate))
        except G2trtError:
            continue
    raise ModelError(f"{engine}: no manifest.json beside it or beside its ONNX ({meta.onnx}), so its config is unknown")


def graph_contract(manifest: dict) -> tuple[io.KvCache, bool]:
    """(KV cache contract, whether sliding layers need full-length buffers) a graph's manifest records."""
    options = manifest.get("options") or {}
    contract = options.get("kv_cache") or "dynamic"
    if contract not in io.KV_CACHES:
        raise ModelError(f"manifest kv_cache {contract!r} is neither of {', '.join(io.KV_CACHES)}")
    return contract, manifest.get("kv_cache_sliding") == "full"


def open_runner(
    ref: ModelRef,
    backend: str,
    *,
    work_dir: Path | None = None,
    threads: int | None = None,
    name: str | None = None,
    kv_cache: io.KvCache | None = None,
) -> Runner | InplaceRunner:
    """The runner of `backend` for `ref`; an onnxruntime run of a checkpoint exports into `work_dir` first.

    `kv_cache`: the contract to run (None: the graph's own, and in-place for what this call exports or
    for PyTorch). A graph of the other contract is a one-line error.
    """
    check_backend(backend)
    if kv_cache is not None and kv_cache not in io.KV_CACHES:
        raise ModelError(f"--kv-cache {kv_cache!r}: choose {' or '.join(io.KV_CACHES)}")
    if backend == "torch":
        from deploy.runners.torch_runner import TorchInplaceRunner, TorchRunner
        from export.weights import load_model

        if threads:
            import torch

            torch.set_num_threads(threads)
        model = load_model(ref.weights(), "fp32")
        if kv_cache == "dynamic":
            return TorchRunner(model, name=name or "torch")
        return TorchInplaceRunner(model, name=name or "torch")
    if backend == "ort":
        from deploy.runners.ort_runner import OrtInplaceRunner, OrtRunner

        if ref.kind == "engine":
            raise ModelError(f"{ref.path}: the ort backend needs an ONNX model or checkpoint, not an engine")
        path = ref.path if ref.kind == "onnx" else export_for_ort(ref, work_dir, kv_cache or "inplace")
        assert path is not None
        contract, full_sliding = graph_contract(read_manifest(path))
        _check_contract(path, contract, kv_cache)
        if contract == "dynamic":
            return OrtRunner(path, ref.config, name=name or "ort", threads=threads)
        return OrtInplaceRunner(path, ref.config, name=name or "ort", threads=threads, full_sliding=full_sliding)
    from deploy.runners.trt_runner import open_trt_runner

    if ref.kind != "engine":
        raise ModelError(f"{ref.path or ref.preset}: the trt backend needs an engine built by `g2trt build`")
    assert ref.path is not None
    return open_trt_runner(ref.path, ref.config, name=name or "trt", kv_cache=kv_cache)


def _check_contract(path: Path, contract: str, wanted: str | None) -> None:
    if wanted is not None and wanted != contract:
        raise ModelError(
            f"{path}: a graph of the {contract} KV cache contract, but --kv-cache {wanted} was asked for "
            f"(export it with --kv-cache {wanted}, or drop the option)"
        )


def export_for_ort(ref: ModelRef, work_dir: Path | None, kv_cache: io.KvCache = "inplace") -> Path:
    """Export the checkpoint (or preset) to fp32 ONNX under `work_dir` and return model.onnx: the generation
    export, logits of the last position only (what a generation reads; a prompt's other rows cost the
    head's product and memory for nothing)."""
    from export.onnx_export import ExportOptions, export_onnx

    if work_dir is None:
        raise ModelError("the ort backend needs an ONNX model; export one with `g2trt export` first")
    options = ExportOptions(dtype="fp32", kv_cache=kv_cache, last_logits_only=True)
    return export_onnx(ref.weights(), work_dir / "onnx", options).model_path

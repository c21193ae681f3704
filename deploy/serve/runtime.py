"""What the generation model runs on inside the server: its parameters, runner, cache slots and tokenizer.

The model directory (written by `deploy.serve.generate_model`) holds g2trt.json (the Gemma 2 config)
and, in its version folder, model.onnx (+ data) and/or an engine with its side file, and optionally
tokenizer.json. `runtime` (a config.pbtxt parameter) picks the runner:

    auto   the engine when there is one and TensorRT can run it here (a CUDA GPU), else onnxruntime
    trt    the engine, or fail to load with the reason
    ort    onnxruntime (CUDA execution provider first where onnxruntime-gpu has a GPU)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from deploy.generate.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from deploy.runners.base import InplaceRunner, Runner
from deploy.serve.slot_model import InPlaceSlots, RunnerSlots, SlotModel
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import manifest_config

META_FILE = "g2trt.json"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"  # + model.engine.json, its side file
FORMAT = "g2trt-generate/1"
RUNTIMES = ("auto", "ort", "trt")


class ServingError(G2trtError, ValueError):
    """A generation model that cannot load: bad parameters, missing files, no runtime for its model."""


@dataclasses.dataclass(frozen=True)
class ServingParams:
    """config.pbtxt `parameters` of a generation model (strings there; checked here)."""

    slots: int = 8  # requests generating at once (rows of the KV cache)
    max_len: int = 0  # positions per slot (prompt + new tokens); 0: the model's max_position_embeddings
    max_queue: int = 1024  # requests waiting for a slot before new ones are refused
    runtime: str = "auto"
    threads: int = 0  # onnxruntime intra-op threads; 0: onnxruntime's default
    # 0: prompts prefilled in `g2trt generate`'s chunks (onnxruntime: 256 tokens over 512), each prefilling
    # request one call per scheduler iteration; K: prompts over K tokens in chunks of K and one prefill call
    # per iteration, so at most K prompt tokens run between two decode steps (in-place graphs)
    prefill_chunk: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ServingError(f"slots must be >= 1, got {self.slots}")
        if self.max_len < 0:
            raise ServingError(f"max_len must be >= 0 (0: the model's limit), got {self.max_len}")
        if self.max_queue < 1:
            raise ServingError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.runtime not in RUNTIMES:
            raise ServingError(f"runtime {self.runtime!r}: choose {', '.join(RUNTIMES)}")
        if self.threads < 0:
            raise ServingError(f"threads must be >= 0, got {self.threads}")
        if self.prefill_chunk < 0:
            raise ServingError(f"prefill_chunk must be >= 0 (0: generate's chunks), got {self.prefill_chunk}")

    def to_parameters(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_parameters(cls, values: dict[str, str], source: str) -> ServingParams:
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ServingError(f"{source}: unknown parameter {unknown[0]!r} (known: {', '.join(known)})")
        kwargs: dict[str, Any] = {}
        for name, text in values.items():
            if name == "runtime":
                kwargs[name] = text
                continue
            try:
                kwargs[name] = int(text)
            except ValueError:
                raise ServingError(f"{source}: parameter {name} must be an integer, got {text!r}") from None
        try:
            return cls(**kwargs)
        except ServingError as e:
            raise ServingError(f"{source}: {e}") from None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> ServingParams:
        """From Triton's JSON model config (what the Python backend hands `initialize`)."""
        raw = config.get("parameters", {}) or {}
        return cls.from_parameters({k: v.get("string_value", "") for k, v in raw.items()}, source)


@dataclasses.dataclass
class OpenedModel:
    model: SlotModel
    config: Gemma2Config
    tokenizer: Tokenizer | None
    description: str


def read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / META_FILE
    if not path.is_file():
        raise ServingError(f"{model_dir}: no {META_FILE} (not a generation model g2trt packaged)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServingError(f"{path}: not JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ServingError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_files(version_dir: Path) -> tuple[Path | None, Path | None]:
    """(model.onnx, engine) in a version folder; either may be None."""
    onnx, engine = version_dir / ONNX_FILE, version_dir / ENGINE_FILE
    return (onnx if onnx.is_file() else None), (engine if engine.is_file() else None)


def max_len_of(params: ServingParams, cfg: Gemma2Config) -> int:
    if params.max_len > cfg.max_position_embeddings:
        raise ServingError(
            f"max_len {params.max_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})"
        )
    return params.max_len or cfg.max_position_embeddings


def open_slot_model(model_dir: Path, version_dir: Path, params: ServingParams) -> OpenedModel:
    """The runner `params.runtime` selects, with its slots, and the tokenizer beside the model (if any)."""
    cfg = manifest_config(read_meta(model_dir))
    max_len = max_len_of(params, cfg)
    runner, description = _open_runner(version_dir, cfg, params)
    tokenizer_path = version_dir / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.is_file() else None
    if runner.kv_cache == "inplace":  # in-flight batching: one cache, every active slot in one step
        chunk = params.prefill_chunk or "auto"
        model: SlotModel = InPlaceSlots(runner, params.slots, max_len, chunk)  # type: ignore[arg-type]
        return OpenedModel(model, cfg, tokenizer, description + ", in-place KV cache, in-flight batching")
    return OpenedModel(RunnerSlots(runner, params.slots, max_len), cfg, tokenizer, description)  # type: ignore[arg-type]


def _open_runner(version_dir: Path, cfg: Gemma2Config, params: ServingParams) -> tuple[Runner | InplaceRunner, str]:
    onnx, engine = model_files(version_dir)
    if engine is not None and params.runtime in ("auto", "trt"):
        from deploy.runners.trt_runner import open_trt_runner, unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            return open_trt_runner(engine, cfg), f"TensorRT engine {engine.name}"
        if params.runtime == "trt" or onnx is None:
            raise ServingError(f"{engine}: cannot run here: {reason}")
    elif params.runtime == "trt":
        raise ServingError(f"{version_dir}: runtime trt needs an engine, and there is none")
    if onnx is None:
        raise ServingError(f"{version_dir}: no model.onnx")
    from deploy.runners.factory import graph_contract
    from deploy.runners.ort_runner import OrtInplaceRunner, OrtRunner
    from export.manifest import read_manifest

    contract, full_sliding = graph_contract(read_manifest(onnx))
    threads = params.threads or None
    runner: OrtRunner | OrtInplaceRunner = (
        OrtInplaceRunner(onnx, cfg, threads=threads, full_sliding=full_sliding)
        if contract == "inplace"
        else OrtRunner(onnx, cfg, threads=threads)
    )
    return runner, f"onnxruntime {onnx.name} ({', '.join(runner.session.get_providers())})"

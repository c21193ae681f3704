"""The generation model of a g2trt Triton repository: Triton's Python backend running g2trt's runtime.

    REPO/<name>_generate/config.pbtxt     backend python, decoupled, max_batch_size 0, the request and
                                          response tensors of `deploy.serve.protocol`, parameters (slots,
                                          max_len, max_queue, runtime, threads)
    REPO/<name>_generate/g2trt.json       the Gemma 2 config, what was packaged and from where
    REPO/<name>_generate/1/model.py       a few lines: hands initialize / execute / finalize to
                                          `deploy.serve.triton_model.GenerateModel` (the installed g2trt)
    REPO/<name>_generate/1/model.onnx     (+ its data and manifest.json) onnxruntime; hard links where possible
    REPO/<name>_generate/1/model.engine   (+ model.engine.json) TensorRT, when an engine was packaged
    REPO/<name>_generate/1/tokenizer.json when one was given or found beside the model

Unlike the standard-backend model beside it, the KV cache never leaves the server: a client sends a
prompt and `max_tokens` and reads tokens back (streamed, one response each, when it asks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from deploy.serve import triton_config as tc
from deploy.serve.package import PackageResult, _external_files, _link_or_copy, package
from deploy.serve.protocol import INPUTS, OUTPUTS, TensorSpec
from deploy.serve.runtime import (
    ENGINE_FILE,
    FORMAT,
    META_FILE,
    ONNX_FILE,
    ServingError,
    ServingParams,
    max_len_of,
    model_files,
    read_meta,
)
from export.atomic import atomic_dir
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import MANIFEST, manifest_config

SUFFIX = "_generate"
MODEL_PY = '''"""Triton Python-backend entry of a g2trt generation model (written by `g2trt package`).

The logic is g2trt's `deploy.serve.triton_model.GenerateModel`; g2trt must be importable by the
python3 the backend's stub runs (`g2trt serve` arranges it; in NVIDIA's container: pip install g2trt).
"""

import triton_python_backend_utils as pb_utils

from deploy.serve.triton_model import GenerateModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = GenerateModel(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


class GenerateModelError(G2trtError, ValueError):
    """A generation model that cannot be written, or a directory that is not a valid one."""


@dataclasses.dataclass(frozen=True)
class GenerateModelResult:
    model_dir: Path
    files: tuple[str, ...]  # in the version folder
    tokenizer: Path | None  # where it came from
    params: ServingParams
    max_len: int


def generate_name(name: str) -> str:
    return name + SUFFIX


def package_repository(
    model: str | Path,
    out: str | Path,
    *,
    name: str = "gemma2",
    generate: bool = True,
    tokenizer: str | Path | None = None,
    params: ServingParams = ServingParams(),
    **standard: Any,
) -> tuple[PackageResult, GenerateModelResult | None]:
    """`g2trt package`: the standard-backend model `name` (`deploy.serve.package.package`, for NVIDIA's
    containers) and, unless `generate` is off, the generation model `name`_generate beside it. The
    generation model's inputs are checked first, so a bad setting writes nothing."""
    plan = _plan(model, tokenizer, params) if generate else None
    result = package(model, out, name=name, **standard)
    if plan is None:
        return result, None
    return result, _write(plan, model, Path(out), generate_name(name), params)


def write_generate_model(
    model: str | Path,
    repo: str | Path,
    name: str,
    *,
    tokenizer: str | Path | None = None,
    params: ServingParams = ServingParams(),
) -> GenerateModelResult:
    """Write REPO/`name`/ serving `model` (an ONNX model or an engine) through the Python backend."""
    return _write(_plan(model, tokenizer, params), model, Path(repo), name, params)


@dataclasses.dataclass(frozen=True)
class _Plan:
    config: Gemma2Config
    files: dict[str, Path]  # version-folder name -> source
    tokenizer: Path | None
    max_len: int


def _plan(model: str | Path, tokenizer: str | Path | None, params: ServingParams) -> _Plan:
    """Everything checked, nothing written: the model's config, the files to link, the tokenizer."""
    from deploy.generate.tokenizer import find_tokenizer, load_tokenizer
    from deploy.runners.factory import resolve_model

    ref = resolve_model(model)
    if ref.kind in ("preset", "checkpoint") or ref.path is None:
        raise GenerateModelError(f"{model}: package an ONNX model (g2trt export) or an engine (g2trt build)")
    cfg = ref.config
    max_len = _checked(lambda: max_len_of(params, cfg))
    files = _runtime_files(ref.kind, ref.path)
    found = Path(tokenizer) if tokenizer is not None else find_tokenizer(ref.directory, *_onnx_dirs(files))
    if found is not None:
        tok = load_tokenizer(found)
        if tok.vocab_size > cfg.vocab_size:
            raise GenerateModelError(f"{tok.path}: {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
        files["tokenizer.json"] = tok.path
    return _Plan(cfg, files, found, max_len)


def _write(plan: _Plan, model: str | Path, repo: Path, name: str, params: ServingParams) -> GenerateModelResult:
    cfg, files = plan.config, plan.files
    config = tc.ModelConfig(name=name, backend="python", max_batch_size=0)
    _add(config.input, INPUTS, optional=True)
    _add(config.output, OUTPUTS, optional=False)
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(count=1, kind=tc.INSTANCE_KINDS["KIND_CPU"])  # the model picks its own device
    for key, value in params.to_parameters().items():
        config.parameters[key].string_value = value
    meta = {
        "format": FORMAT,
        "source": str(Path(model).resolve()),
        "config": cfg.to_hf_dict(),
        "files": {k: str(v.resolve()) for k, v in files.items()},
        "inputs": [dataclasses.asdict(s) for s in INPUTS],
        "outputs": [dataclasses.asdict(s) for s in OUTPUTS],
    }
    with atomic_dir(repo / name) as tmp:
        version = tmp / "1"
        version.mkdir()
        for dest, src in files.items():
            _link_or_copy(src, version / dest)
        (version / "model.py").write_text(MODEL_PY)
        (tmp / "config.pbtxt").write_text(tc.to_text(config))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    model_dir = repo / name
    validate_generate_model(model_dir)
    return GenerateModelResult(model_dir, tuple(files), plan.tokenizer, params, plan.max_len)


def _runtime_files(kind: str, path: Path) -> dict[str, Path]:
    """Version-folder name -> source: the ONNX (with its data files), or the engine, its side file and,
    when it still exists, the ONNX it was built from (onnxruntime's fallback on machines without a GPU)."""

    def onnx_files(onnx: Path) -> dict[str, Path]:
        out = {ONNX_FILE: onnx}
        for data in _external_files(onnx):
            if not data.is_file():
                raise GenerateModelError(f"{onnx}: external data file {data.name} is missing")
            out[data.name] = data
        if (onnx.parent / MANIFEST).is_file():  # its KV cache contract and sliding buffers (the runtime reads it)
            out[MANIFEST] = onnx.parent / MANIFEST
        return out

    if kind == "onnx":
        return onnx_files(path)
    from deploy.engine.meta import load_engine_meta, meta_path

    meta = load_engine_meta(path)
    files = {ENGINE_FILE: path, ENGINE_FILE + ".json": meta_path(path)}
    if Path(meta.onnx).is_file():
        files |= onnx_files(Path(meta.onnx))
    return files


def _onnx_dirs(files: dict[str, Path]) -> list[Path]:
    return [files[ONNX_FILE].parent] if ONNX_FILE in files else []


def _add(fields: Any, specs: tuple[TensorSpec, ...], *, optional: bool) -> None:
    for s in specs:
        entry = fields.add(name=s.name, data_type=tc.DATA_TYPES[s.data_type], dims=list(s.dims))
        if optional and s.optional:
            entry.optional = True


def _checked(fn: Any) -> Any:
    try:
        return fn()
    except ServingError as e:
        raise GenerateModelError(str(e)) from None


def validate_generate_model(model_dir: Path, config: Any | None = None) -> None:
    """Check a generation model directory: config (decoupled Python backend, the g2trt request and response
    tensors, parameters), g2trt.json, and each version's model.py, model files and tokenizer."""
    config_path = model_dir / "config.pbtxt"
    if config is None:
        config = tc.parse(config_path.read_text(), str(config_path))
    where = str(config_path)
    if config.backend != "python":
        raise GenerateModelError(f"{where}: backend {config.backend!r}, a generation model runs on 'python'")
    if config.max_batch_size != 0:
        raise GenerateModelError(f"{where}: max_batch_size must be 0 (requests are batched by the model's slots)")
    if not config.model_transaction_policy.decoupled:
        raise GenerateModelError(f"{where}: model_transaction_policy.decoupled must be true (it streams tokens)")
    for kind, declared, specs in (("input", config.input, INPUTS), ("output", config.output, OUTPUTS)):
        got = [(d.name, tc.data_type_name(d.data_type), tuple(d.dims)) for d in declared]
        want = [(s.name, s.data_type, s.dims) for s in specs]
        if got != want:
            diff = next((g, w) for g, w in zip([*got, None], [*want, None], strict=False) if g != w)
            raise GenerateModelError(f"{where}: {kind} {diff[0]} where the g2trt protocol has {diff[1]}")
    values = {k: v.string_value for k, v in config.parameters.items()}
    params = _checked(lambda: ServingParams.from_parameters(values, where))
    cfg: Gemma2Config = manifest_config(_checked(lambda: read_meta(model_dir)))
    try:
        max_len_of(params, cfg)
    except ServingError as e:
        raise GenerateModelError(f"{where}: {e}") from None
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise GenerateModelError(f"{model_dir}: no numeric version directory (expected {model_dir.name}/1/)")
    for version in versions:
        if not (version / "model.py").is_file():
            raise GenerateModelError(f"{version}: no model.py")
        onnx, engine = model_files(version)
        if onnx is None and engine is None:
            raise GenerateModelError(f"{version}: neither {ONNX_FILE} nor {ENGINE_FILE}")
        if engine is not None and not (version / (ENGINE_FILE + ".json")).is_file():
            raise GenerateModelError(f"{engine}: its side file {ENGINE_FILE}.json is missing")
        if onnx is not None:
            try:
                data_files = _external_files(onnx)
            except Exception as e:  # onnx raises protobuf's DecodeError, OSError, ...
                raise GenerateModelError(f"{onnx}: unreadable ONNX ({str(e).splitlines()[0][:200]})") from None
            missing = [d.name for d in data_files if not d.is_file()]
            if missing:
                raise GenerateModelError(f"{onnx}: external data file {missing[0]} is missing beside it")


def print_generate_result(result: GenerateModelResult) -> None:
    from deploy import console as ui

    p = result.params
    rows = [
        ("model", str(result.model_dir)),
        ("backend", "python (decoupled: streams tokens), g2trt runtime inside the server"),
        ("files", ", ".join(result.files)),
        ("tokenizer", str(result.tokenizer) if result.tokenizer else "none: input_ids only"),
        ("slots / positions", f"{p.slots} x {result.max_len} (runtime {p.runtime})"),
        ("inputs", ", ".join(s.name for s in INPUTS)),
        ("outputs", ", ".join(s.name for s in OUTPUTS)),
        ("serve with", f"g2trt serve {result.model_dir.parent}"),
    ]
    ui.out.print(ui.table("g2trt package: generation model", ["", ""], rows))

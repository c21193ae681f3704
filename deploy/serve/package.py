"""`g2trt package`: a Triton Inference Server model repository for an ONNX model or a TensorRT engine.

    REPO/<name>/config.pbtxt           backend, max_batch_size, I/O (names, types, dims), batching, instances
    REPO/<name>/1/model.onnx (+ .data) onnxruntime backend
    REPO/<name>/1/model.plan           tensorrt backend
    REPO/<name>/g2trt.json             what was packaged, from where, and how to start the server

I/O come from the model itself (the ONNX graph, or for an engine the ONNX its side file names) and must be
the g2trt contract. Every tensor's first dim is the batch, so `max_batch_size > 0` and dims leave it out;
the other dynamic dims are -1. The KV cache is explicit I/O (the client sends `past_key_values.*` and
receives `present.*`): the dynamic batcher only groups requests whose non-batch dims match (same prompt
and past lengths), which is what Triton's batcher does for any input that is not ragged.

Engines (Triton's tensorrt backend): the instance group names every optimization profile of the engine
(`profile: ["0", "1"]`, prefill and decode), or Triton would use profile 0 alone and run decode on prefill
tactics, refusing decodes longer than the prefill profile's past. `max_batch_size` defaults to, and may not
exceed, the smallest max batch of the engine's profiles (Triton refuses a repository whose max batch the
engine cannot run). g2trt.json records what the model requires of the server: the exact TensorRT that
built the plan (a plan loads in no other), or the onnxruntime an `ort` graph needs (its manifest's). An
`ort` graph lowered for the CPU provider gets CPU instances (`--kind gpu` is refused: onnxruntime's CUDA
kernel rejects its GroupQueryAttention's attention_bias); one lowered with `--provider cuda` may use GPUs.

Plugins: the onnxruntime backend runs the plain and `ort` graphs (com.microsoft contrib ops are built into
onnxruntime); a `trt` graph's g2trt plugin nodes have no onnxruntime kernel outside Python, so such a graph
is refused here and shipped as an engine. Engines built with g2trt's plugins carry them as ahead-of-time
kernels inside the plan (`tensorrt.plugin` `aot_impl`), so the server needs no plugin library; a plugin
compiled to a shared library would instead be loaded with `--backend-config=tensorrt,plugins="a.so;b.so"` or
`LD_PRELOAD` (`plugin_libraries` records them in g2trt.json and in the printed command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from deploy.serve import triton_config as tc
from export import io_contract as io
from export.atomic import atomic_dir
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import manifest_config, read_manifest

ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
BACKEND_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
META_FILE = "g2trt.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class PackageError(G2trtError, ValueError):
    """A model that cannot be packaged, or a repository that does not match its model."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # without the batch dim; -1 for dynamic


@dataclasses.dataclass(frozen=True)
class PackageResult:
    model_dir: Path
    config_path: Path
    backend: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    server_command: str


def model_io(onnx_path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX graph as Triton sees them with batching on (batch dim dropped)."""
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises OSError, protobuf's DecodeError, ...
        raise PackageError(f"{onnx_path}: unreadable ONNX ({str(e).splitlines()[0][:200]})") from None

    def convert(values: Any) -> list[Tensor]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TYPES:
                raise PackageError(f"{onnx_path}: {v.name} has element type {t.elem_type}, which Triton cannot carry")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            first = t.shape.dim[0] if t.shape.dim else None
            if first is None or first.dim_param != io.BATCH:
                raise PackageError(f"{onnx_path}: {v.name} has no leading {io.BATCH!r} dim, so it cannot be batched")
            out.append(Tensor(v.name, ONNX_TYPES[t.elem_type], tuple(dims[1:])))
        return out

    return convert(proto.graph.input), convert(proto.graph.output)


def check_contract(cfg: Gemma2Config, inputs: Sequence[Tensor], outputs: Sequence[Tensor], source: str) -> None:
    """The graph keeps one of the two KV cache contracts (an in-place graph's buffers travel as explicit
    I/O here too: Triton's standard backends keep no state, so only the generation model writes in place)."""
    names = [t.name for t in inputs]
    for kind, got, want in (
        ("inputs", names, io.input_names(cfg, io.contract_of(names))),
        ("outputs", [t.name for t in outputs], io.output_names(cfg)),
    ):
        if got != want:
            missing = [n for n in want if n not in got][:3]
            extra = [n for n in got if n not in want][:3]
            raise PackageError(
                f"{source}: {kind} differ from the g2trt I/O contract (missing {missing}, unexpected {extra})"
            )


def _plugin_domains(onnx_path: Path) -> set[str]:
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {o.domain for o in proto.opset_import}


def _external_files(onnx_path: Path) -> list[Path]:
    """The external data files `onnx_path` references (each must be copied beside it)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [onnx_path.parent / n for n in sorted(names)]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when src and dst share a filesystem (no second copy of multi-GB weights), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def package(
    model: str | Path,
    out: str | Path,
    *,
    name: str = "gemma2",
    max_batch_size: int | None = None,
    instances: int = 1,
    kind: str = "auto",
    max_queue_delay_us: int = 100,
    dynamic_batching: bool = True,
    plugin_libraries: Sequence[str] = (),
) -> PackageResult:
    """Write REPO `out`/`name`/ for `model` (model.onnx, its directory, or an engine with its side file).

    `max_batch_size`: None takes the engine's largest batch every profile runs (8 for ONNX)."""
    from deploy.runners.factory import resolve_model

    if not _NAME.match(name):
        raise PackageError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (it is a directory name)")
    if max_batch_size is not None and max_batch_size < 1:
        raise PackageError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if instances < 1:
        raise PackageError(f"--instances must be >= 1, got {instances}")
    if kind not in ("auto", "gpu", "cpu"):
        raise PackageError(f"--kind {kind!r}: choose auto, gpu or cpu")
    ref = resolve_model(model)
    if ref.kind in ("preset", "checkpoint"):
        raise PackageError(
            f"{model}: package an ONNX model (g2trt export) or an engine (g2trt build), not a checkpoint"
        )
    assert ref.path is not None
    profiles: list[str] = []
    engine: dict[str, Any] = {}
    if ref.kind == "onnx":
        backend, onnx_path, files = "onnxruntime", ref.path, [ref.path, *_external_files(ref.path)]
        manifest = read_manifest(onnx_path)
        requires = dict(manifest.get("requires") or {})
        max_batch_size = 8 if max_batch_size is None else max_batch_size
        kind = _ort_form_kind(manifest, kind, str(onnx_path))
        if "g2trt" in _plugin_domains(onnx_path):
            raise PackageError(
                f"{onnx_path}: has g2trt plugin nodes, which onnxruntime in Triton cannot run; "
                "build an engine from it (g2trt build) and package the engine"
            )
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PackageError(f"{onnx_path}: external data file {missing[0].name} is missing")
    else:
        from deploy.engine.meta import check_engine_compatible, load_engine_meta, meta_path

        meta = load_engine_meta(ref.path)
        check_engine_compatible(ref.path, meta.trt_version, None)  # size, magic and sha256 of the plan
        if meta.backend != "tensorrt":
            raise PackageError(
                f"{ref.path}: built by TensorRT-RTX; Triton's tensorrt backend runs full-TensorRT plans only "
                "(build with --backend tensorrt on the serving GPU, or package the ONNX for onnxruntime)"
            )
        backend, onnx_path, files = "tensorrt", Path(meta.onnx), [ref.path, meta_path(ref.path)]
        engine = engine_batching(meta, str(ref.path))
        profiles = [str(p["index"]) for p in engine["profiles"]]
        requires = {"tensorrt": f"=={meta.trt_version}"}  # a plan loads only in the TensorRT that built it
        max_batch_size = _batch_cap(max_batch_size, engine, str(ref.path))
    inputs, outputs = model_io(onnx_path)
    check_contract(ref.config, inputs, outputs, str(onnx_path))

    config = tc.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    for t in inputs:
        config.input.add(name=t.name, data_type=tc.DATA_TYPES[t.data_type], dims=list(t.dims))
    for t in outputs:
        config.output.add(name=t.name, data_type=tc.DATA_TYPES[t.data_type], dims=list(t.dims))
    if dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    group_kind = {"auto": "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
    if backend == "tensorrt" and kind == "cpu":
        raise PackageError("--kind cpu: TensorRT engines run on GPUs only")
    config.instance_group.add(count=instances, kind=tc.INSTANCE_KINDS[group_kind[kind]], profile=profiles)
    config.default_model_filename = BACKEND_FILES[backend]

    plugins = list(plugin_libraries)
    command = f"tritonserver --model-repository={Path(out).resolve()}"
    if plugins:
        command += f' --backend-config=tensorrt,plugins="{";".join(plugins)}"'
    out = Path(out)
    with atomic_dir(out / name) as tmp:
        (tmp / "1").mkdir()
        target = tmp / "1" / BACKEND_FILES[backend]
        _link_or_copy(files[0], target)
        if backend == "onnxruntime":
            for data in files[1:]:
                _link_or_copy(data, tmp / "1" / data.name)
        (tmp / "config.pbtxt").write_text(tc.to_text(config))
        meta_json = {
            "format": "g2trt-triton/1",
            "source": str(Path(model).resolve()),
            "backend": backend,
            "onnx": str(onnx_path.resolve()),
            "config": ref.config.to_hf_dict(),
            "plugin_libraries": plugins,
            "requires": requires,
            **({"engine": engine} if engine else {}),
            "server_command": command,
            "kv_cache": "explicit I/O: send past_key_values.* and read present.* each step (see docs/runtime.md)",
        }
        (tmp / META_FILE).write_text(json.dumps(meta_json, indent=2) + "\n")
    model_dir = out / name
    validate_repository(out, name)
    return PackageResult(model_dir, model_dir / "config.pbtxt", backend, tuple(inputs), tuple(outputs), command)


def _ort_form_kind(manifest: dict[str, Any], kind: str, source: str) -> str:
    """An `ort` graph lowered for the CPU provider runs on CPU instances only: its GroupQueryAttention takes
    attention_bias, which onnxruntime's CUDA kernel (Triton's GPU instances) rejects."""
    if manifest.get("target") != "ort" or manifest.get("provider", "cpu") != "cpu":
        return kind
    if kind == "gpu":
        raise PackageError(
            f"{source}: lowered for onnxruntime's CPU provider (its GroupQueryAttention takes attention_bias, "
            "which the CUDA kernel rejects): optimize with --target ort --provider cuda for GPU instances"
        )
    return "cpu"


def engine_batching(meta: Any, source: str) -> dict[str, Any]:
    """The engine's profiles as Triton's tensorrt backend sees them: index, name and max batch (the smallest
    max of dim 0 over the profile's inputs, as Triton computes it), and the batch every profile runs."""
    if not meta.profiles:
        raise PackageError(f"{source}: its side file lists no optimization profiles; rebuild it with `g2trt build`")
    rows = []
    for index, p in enumerate(meta.profiles):
        maxima = [int(shapes[2][0]) for shapes in p["shapes"].values() if shapes and shapes[2]]
        if not maxima:
            raise PackageError(f"{source}: profile {p.get('name', index)!r} has no input shapes in its side file")
        rows.append({"index": index, "name": p.get("name", str(index)), "max_batch": min(maxima)})
    return {"profiles": rows, "max_batch": min(r["max_batch"] for r in rows)}


def _batch_cap(requested: int | None, engine: dict[str, Any], source: str) -> int:
    cap = int(engine["max_batch"])
    if requested is None:
        return cap
    if requested > cap:
        worst = min(engine["profiles"], key=lambda r: r["max_batch"])
        raise PackageError(
            f"{source}: --max-batch-size {requested} exceeds the engine's max batch {cap} (profile "
            f"{worst['name']!r}); Triton would refuse it: rebuild with --max batch={requested} or package with {cap}"
        )
    return requested


def validate_repository(repo: str | Path, name: str | None = None) -> list[str]:
    """Check each model directory of `repo` (or just `name`) against the model it holds; returns the names.

    Layout (config.pbtxt, version 1, the backend's model file and, for ONNX, its external data), the
    config itself (parsed strictly against Triton's schema; name = directory; backend, platform) and
    the config's I/O (names, types, dims) against the model's graph and the g2trt contract.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise PackageError(f"{repo}: not a directory")
    names = [name] if name else sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise PackageError(f"{repo}: no model directories")
    for model_name in names:
        _validate_model(repo / model_name)
    return names


def _validate_model(model_dir: Path) -> None:
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise PackageError(f"{model_dir}: no config.pbtxt")
    config = tc.parse(config_path.read_text(), str(config_path))
    if config.name != model_dir.name:
        raise PackageError(f"{config_path}: name {config.name!r} differs from its directory {model_dir.name!r}")
    if config.backend == "python":  # a generation model (g2trt's runtime inside the server)
        from deploy.serve.generate_model import validate_generate_model

        return validate_generate_model(model_dir, config)
    if config.backend not in BACKEND_FILES:
        raise PackageError(
            f"{config_path}: backend {config.backend!r} is not one g2trt packages ({list(BACKEND_FILES)})"
        )
    if config.platform and config.platform != PLATFORMS[config.backend]:
        raise PackageError(f"{config_path}: platform {config.platform!r} contradicts backend {config.backend!r}")
    if config.max_batch_size < 1:
        raise PackageError(f"{config_path}: max_batch_size must be >= 1 (every g2trt tensor has a batch dim)")
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise PackageError(f"{model_dir}: no numeric version directory (expected {model_dir.name}/1/)")
    filename = config.default_model_filename or BACKEND_FILES[config.backend]
    if filename != BACKEND_FILES[config.backend]:
        raise PackageError(
            f"{config_path}: default_model_filename {filename!r}, expected {BACKEND_FILES[config.backend]}"
        )
    meta_file = model_dir / META_FILE
    if not meta_file.is_file():
        raise PackageError(f"{model_dir}: no {META_FILE} (not a repository g2trt packaged)")
    meta = json.loads(meta_file.read_text())
    cfg = manifest_config({"config": meta["config"]})
    for version in versions:
        model_file = version / filename
        if not model_file.is_file():
            raise PackageError(f"{version}: no {filename}")
        if config.backend == "onnxruntime":
            for data in _external_files(model_file):
                if not data.is_file():
                    raise PackageError(f"{model_file}: external data file {data.name} is missing beside it")
            graph = model_file
        else:
            graph = Path(meta["onnx"])
            if not graph.is_file():
                raise PackageError(f"{meta_file}: the engine's ONNX {graph} is gone, so its I/O cannot be checked")
        inputs, outputs = model_io(graph)
        check_contract(cfg, inputs, outputs, str(graph))
        _compare(config_path, "input", config.input, inputs)
        _compare(config_path, "output", config.output, outputs)
    _check_batching(config_path, config, meta.get("engine"))


def _check_batching(config_path: Path, config: Any, engine: dict[str, Any] | None) -> None:
    """Profiles only for engines, every one of them named; max_batch_size within what the engine runs."""
    named = [list(g.profile) for g in config.instance_group]
    if engine is None:
        if any(named):
            raise PackageError(f"{config_path}: instance_group profile is for TensorRT engines only")
        return
    want = [str(p["index"]) for p in engine["profiles"]]
    for got in named:
        if sorted(got) != want:
            raise PackageError(
                f"{config_path}: instance_group profile {got} must name every engine profile {want} "
                "(Triton uses profile 0 alone otherwise: decode would run on prefill tactics)"
            )
    if config.max_batch_size > engine["max_batch"]:
        raise PackageError(
            f"{config_path}: max_batch_size {config.max_batch_size} exceeds the engine's max batch "
            f"{engine['max_batch']}"
        )


def _compare(config_path: Path, kind: str, declared: Any, actual: Sequence[Tensor]) -> None:
    got = {d.name: d for d in declared}
    want = {t.name: t for t in actual}
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        raise PackageError(f"{config_path}: {kind}s differ from the model (missing {missing}, unexpected {extra})")
    for n, t in want.items():
        d = got[n]
        if tc.data_type_name(d.data_type) != t.data_type:
            raise PackageError(
                f"{config_path}: {kind} {n} is {tc.data_type_name(d.data_type)}, the model has {t.data_type}"
            )
        if tuple(d.dims) != t.dims:
            raise PackageError(f"{config_path}: {kind} {n} dims {list(d.dims)}, the model has {list(t.dims)}")


def print_result(result: PackageResult) -> None:
    from deploy import console as ui

    rows = [
        ("model", str(result.model_dir)),
        ("backend", result.backend),
        ("inputs / outputs", f"{len(result.inputs)} / {len(result.outputs)}"),
        ("config", str(result.config_path)),
        ("serve with", result.server_command),
    ]
    ui.out.print(ui.table("g2trt package", ["", ""], rows))

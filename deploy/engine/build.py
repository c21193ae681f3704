"""`g2trt build`: an ONNX graph -> a TensorRT engine, its side file and a build report.

    report = build_engine("out/onnx/model.onnx", "out/engine/model.engine",
                          BuildOptions(backend="tensorrt-rtx", sms=(89,)))

The network is strongly typed: every tensor keeps the precision the ONNX gives it (an fp16 engine
comes from an fp16 export; TensorRT never picks precisions by itself, so fp32 residuals and norms stay
fp32). Two optimization profiles (prefill, decode; see deploy/engine/profiles.py). Everything that can be
checked before TensorRT runs is checked first, so bad input is a one-line error rather than a
TensorRT log or, for TensorRT-RTX given a plugin, an aborted process. The engine and its side file are
written atomically; the engine streams to disk while it is hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from deploy.engine import profiles as prof
from deploy.engine import trt_api
from deploy.engine.backend import TrtBackend, UnsupportedTargetError, no_gc_inside_tensorrt, resolve_backend
from deploy.engine.meta import EngineMeta, meta_path, write_engine_meta
from deploy.engine.onnx_info import OnnxInfo, inspect_onnx
from deploy.engine.report import BuildReport
from export.atomic import atomic_file
from export.errors import G2trtError

# Quantized weights TensorRT cannot build below an SM: FP8 needs Ada (89) or newer; INT4 block
# quantization needs Ampere (80) (docs/quantization.md).
_MIN_SM = {"fp8": 89, "int4": 80}


class BuildError(G2trtError):
    """TensorRT could not parse or build the graph, or the graph needs what the backend lacks."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    backend: str = "auto"  # "auto" | "tensorrt" | "tensorrt-rtx"
    sms: tuple[int, ...] = ()  # TensorRT-RTX targets; empty: the local GPU, or SM 89 without one
    min: Mapping[str, int] = dataclasses.field(default_factory=dict)  # profile dims: batch / seq / past
    opt: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max: Mapping[str, int] = dataclasses.field(default_factory=dict)
    timing_cache: Path | None = None  # full TensorRT only (TensorRT-RTX has none)
    plugins: bool = False  # register g2trt's TensorRT plugins (full TensorRT: tensorrt.plugin, AOT kernels)
    optimization_level: int | None = None  # builder optimization level 0-5; None: the backend's default (3)
    verbose: bool = False  # echo TensorRT's log to stderr


def onnx_model_path(path: str | Path) -> Path:
    """Accept the model file or the directory `g2trt export` wrote (holding model.onnx)."""
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions = BuildOptions()) -> BuildReport:
    """Check, parse, build and write `engine_path` + its side file; G2trtError (one line) on bad input."""
    with no_gc_inside_tensorrt():  # this call's TensorRT objects are freed (and collected) before it returns
        return _build_engine(onnx_path, engine_path, options)


def _build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions) -> BuildReport:
    onnx_path, engine_path = onnx_model_path(onnx_path), Path(engine_path)
    info = inspect_onnx(onnx_path)
    backend = resolve_backend(options.backend)
    _check_plugins(info, backend, options)
    sms = backend.resolve_targets(options.sms)
    ranges = prof.make_ranges(options.min, options.opt, options.max, info.max_positions)
    profiles = prof.plan_profiles(info.inputs, ranges)
    static = prof.static_dims(info.inputs, ranges)
    _check_inplace(onnx_path, static)
    if info.dtype == "bf16" and min(sms) < 80:
        raise UnsupportedTargetError(f"{onnx_path}: bf16 engines need SM 80 or newer (--sm {min(sms)} has no bf16)")
    need = _MIN_SM.get(info.weights or "")
    if need is not None and min(sms) < need:
        raise UnsupportedTargetError(
            f"{onnx_path}: {info.weights} weights need SM {need} or newer (--sm {min(sms)}); "
            "export with another --quant for older GPUs"
        )

    trt = backend.trt
    logger = backend.logger(echo=options.verbose)
    builder: trt_api.Builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(backend, network, onnx_path, logger, options.plugins, sms[0], static)
    config = _configure(backend, builder, sms, profiles, options, onnx_path, logger)
    notes, cache = _timing_cache(backend, config, options.timing_cache)
    layers = Counter(str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers))

    start = time.perf_counter()
    with atomic_file(engine_path) as tmp:
        size, digest, magic = _build_to_file(backend, builder, network, config, tmp, logger, onnx_path)
    seconds = time.perf_counter() - start
    if cache is not None and options.timing_cache is not None:
        with atomic_file(options.timing_cache) as tmp_cache:
            tmp_cache.write_bytes(bytes(cache.serialize()))

    layers_source = "network"
    if not backend.ahead_of_time:  # the full TensorRT runs here: ask the engine what it fused into
        engine_layers = _engine_layers(backend, engine_path, logger)
        if engine_layers:
            layers, layers_source = engine_layers, "engine"
    meta = EngineMeta(
        backend=backend.name,
        trt_version=backend.version,
        target_sms=sms,
        dtype=info.dtype,
        onnx=str(onnx_path),
        onnx_sha256=info.sha256,
        profiles=tuple(p.to_json() for p in profiles),
        plugins=dict(info.plugin_nodes),
        engine_bytes=size,
        engine_sha256=digest,
        engine_magic=magic,
    )
    report = BuildReport(
        engine=engine_path,
        meta_file=meta_path(engine_path),
        meta=meta,
        ranges=_ranges_json(ranges, info),
        layers=dict(layers),
        layers_source=layers_source,
        build_seconds=seconds,
        optimization_level=int(config.builder_optimization_level),
        notes=tuple(notes),
        warnings=tuple(logger.warnings),
    )
    write_engine_meta(engine_path, meta, {"build": report.build_json()})
    return report


def _parse(
    backend: TrtBackend,
    network: trt_api.INetworkDefinition,
    onnx_path: Path,
    logger: Any,
    plugins: bool,
    target_sm: int,
    static: Mapping[str, int],
) -> None:
    parser: trt_api.OnnxParser = backend.trt.OnnxParser(network, logger)
    if plugins:
        from trt_plugins.registration.tensorrt_qdp import canonical_plugin_model, register_plugins

        register_plugins(backend.trt, target_sm=target_sm)
        parsed = parser.parse(_with_static_dims(canonical_plugin_model(onnx_path), static), str(onnx_path))
    elif static:
        model = Path(onnx_path).read_bytes()
        parsed = parser.parse(_with_static_dims(model, static), str(onnx_path))  # weights: beside onnx_path
    else:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        raise BuildError(f"{onnx_path}: {backend.label} cannot parse the model: {_parser_error(parser, logger)}")


def _with_static_dims(model: bytes, static: Mapping[str, int]) -> bytes:
    """The graph with the named dims of its inputs and outputs made static (in memory; the file is untouched).

    TensorRT's KV-cache update needs the cache length static in the network itself, not only in a
    profile; every other dim stays dynamic.
    """
    if not static:
        return model
    import onnx

    proto = onnx.ModelProto.FromString(model)
    for value in [*proto.graph.input, *proto.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in static:
                d.dim_value = static[d.dim_param]
    return bytes(proto.SerializeToString())


def _check_inplace(onnx_path: Path, static: Mapping[str, int]) -> None:
    """An in-place graph whose target needs full-length sliding buffers gets ring = cache."""
    from export import io_contract as io

    if io.SLIDING_CACHE not in static or io.CACHE not in static:
        return
    from export.manifest import read_manifest

    try:
        needs_full = read_manifest(onnx_path).get("kv_cache_sliding") == "full"
    except G2trtError:
        return
    if needs_full and static[io.SLIDING_CACHE] != static[io.CACHE]:
        raise BuildError(
            f"{onnx_path}: this graph keeps sliding layers at full length (TensorRT's KV-cache update is linear): "
            f"ring {static[io.SLIDING_CACHE]} must equal cache {static[io.CACHE]} (drop ring=, or give ring=cache)"
        )


def _configure(
    backend: TrtBackend,
    builder: trt_api.Builder,
    sms: tuple[int, ...],
    profiles: list[prof.Profile],
    options: BuildOptions,
    onnx_path: Path,
    logger: Any,
) -> trt_api.IBuilderConfig:
    """Targets, both optimization profiles, layer-detail verbosity (for the inspector), optimization level;
    with plugins, plugin I/O aliasing."""
    config = builder.create_builder_config()
    backend.apply_targets(config, sms)
    config.profiling_verbosity = backend.trt.ProfilingVerbosity.DETAILED
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.plugins:  # the in-place attention plugin's presents alias its pasts
        from trt_plugins.registration.tensorrt_qdp import enable_aliased_plugin_io

        enable_aliased_plugin_io(backend.trt, config)
    for p in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in p.shapes.items():
            trt_profile.set_shape(name, lo, mid, hi)
        if config.add_optimization_profile(trt_profile) < 0:
            raise BuildError(f"{onnx_path}: {backend.label} rejected the {p.name} profile: {_last(logger)}")
    return config


def _check_plugins(info: OnnxInfo, backend: TrtBackend, options: BuildOptions) -> None:
    """Refuse plugin graphs the backend cannot build before TensorRT sees them (RTX 1.7 would abort)."""
    if backend.ahead_of_time and (info.has_plugins or options.plugins):
        what = f"has g2trt plugin nodes ({info.plugin_summary()})" if info.has_plugins else "was built with --plugins"
        raise BuildError(
            f"{info.path}: {what}, and {backend.label} cannot run Python plugins (1.7 aborts the process; "
            "see docs/build.md): build the trt-native graph, or use --backend tensorrt --plugins on a GPU"
        )
    if info.has_plugins and not options.plugins:
        raise BuildError(
            f"{info.path}: has g2trt plugin nodes ({info.plugin_summary()}): pass --plugins to register "
            "g2trt's TensorRT plugins, or build the trt-native graph"
        )


def _parser_error(parser: trt_api.OnnxParser, logger: Any) -> str:
    if parser.num_errors == 0:
        return _last(logger)
    e = parser.get_error(0)
    node = e.node_name() or (f"#{e.node()}" if e.node() >= 0 else "")
    where = f"node {node} ({e.node_operator()}): " if node or e.node_operator() else ""
    more = f" (+{parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    return f"{where}{' '.join(str(e.desc()).split())}{more}"


def _last(logger: Any) -> str:
    lines = [" ".join(m.split()) for m in logger.errors if m.strip()]
    return lines[-1] if lines else "no error message from TensorRT"


def _timing_cache(
    backend: TrtBackend, config: trt_api.IBuilderConfig, path: Path | None
) -> tuple[list[str], trt_api.ITimingCache | None]:
    """Load (or start) a timing cache for the full TensorRT; TensorRT-RTX has none (it tunes at run time)."""
    if path is None:
        return [], None
    if backend.ahead_of_time:
        return [f"timing cache {path} not used: {backend.label} has no timing cache (it tunes at run time)"], None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"{path}: {backend.label} cannot use this timing cache (another version or GPU?); delete it")
    return [f"timing cache {path} ({'loaded' if data else 'new'})"], cache


def _build_to_file(
    backend: TrtBackend,
    builder: trt_api.Builder,
    network: trt_api.INetworkDefinition,
    config: trt_api.IBuilderConfig,
    path: Path,
    logger: Any,
    onnx_path: Path,
) -> tuple[int, str, str]:
    """Build, streaming the plan to `path` (no second copy in memory); returns (size, sha256, magic hex)."""
    trt = backend.trt
    with path.open("wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream"):
            writer = _stream_writer(trt, f)
            ok = builder.build_serialized_network_to_stream(network, config, writer)
            size, digest, head = writer.size, writer.sha.hexdigest(), writer.head
        else:
            plan = builder.build_serialized_network(network, config)
            ok = plan is not None
            data = memoryview(plan) if ok else memoryview(b"")
            f.write(data)
            size, digest, head = len(data), hashlib.sha256(data).hexdigest(), bytes(data[:4])
    if not ok or size == 0:
        raise BuildError(f"{onnx_path}: {backend.label} failed to build the engine: {_last(logger)}")
    return size, digest, head.hex()


def _stream_writer(trt: Any, f: BinaryIO) -> Any:
    class _Writer(trt.IStreamWriter):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)
            self.sha = hashlib.sha256()
            self.size = 0
            self.head = b""

        def write(self, data: Any) -> int:
            view = memoryview(data)
            f.write(view)
            self.sha.update(view)
            if len(self.head) < 4:
                self.head += bytes(view[: 4 - len(self.head)])
            self.size += view.nbytes
            return view.nbytes

    return _Writer()


def _engine_layers(backend: TrtBackend, engine_path: Path, logger: Any) -> Counter[str] | None:
    """Layer types after fusion, from IEngineInspector (needs the GPU the engine was built on).

    Unverified here: no full TensorRT and no GPU on the machines g2trt is developed on.
    """
    import json

    trt = backend.trt
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            return None
        raw = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # the report falls back to the network's layers; the engine itself is fine
        return None
    layers = raw.get("Layers", [])
    return Counter(str(layer.get("LayerType", "Unknown")) if isinstance(layer, dict) else "Unknown" for layer in layers)


def _ranges_json(r: prof.ProfileRanges, info: OnnxInfo) -> dict[str, dict[str, list[int]]]:
    """The ranges of the dims the graph has (past for the dynamic KV cache, cache/ring for the in-place one)."""
    from export import io_contract as io

    names = {d for t in info.inputs for d in t.dims if isinstance(d, str)}
    has = {
        "past": bool(names & {io.PAST, io.SLIDING_PAST}),
        "cache": io.CACHE in names,
        "ring": io.SLIDING_CACHE in names,
    }

    def dims(seq: list[int], past: list[int]) -> dict[str, list[int]]:
        out = {"batch": r.batch.as_list(), "seq": seq, "past": past}
        out.update({k: getattr(r, k).as_list() for k in prof.FIXED if getattr(r, k) is not None})
        return {k: v for k, v in out.items() if has.get(k, True)}

    return {
        prof.PREFILL: dims(r.seq.as_list(), r.prefill_past().as_list()),
        prof.DECODE: dims([1, 1, 1], r.past.as_list()),
    }

"""onnxruntime as a runner (CPU EP here; CUDA EP where onnxruntime-gpu and a GPU are present).

Providers follow the graph's manifest: an `ort` graph lowered for the CPU provider (its GroupQueryAttention
takes attention_bias, which onnxruntime's CUDA kernel rejects) runs on the CPU provider only; one lowered
with `--provider cuda`, and every other graph, gets CUDA first where this onnxruntime has it. What the
manifest says the graph requires of onnxruntime (`requires`) is checked before the session is made.

Any g2trt graph runs here: the plain export, the `ort` target (com.microsoft contrib ops, built into
onnxruntime) and the `trt` target, whose g2trt plugin nodes run as the reference ops that
`trt_plugins.ort_ops` registers, so a TensorRT graph is checked token for token without a GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from deploy.runners import denormals
from deploy.runners.base import (
    CacheSizeError,
    InplaceCache,
    KVCache,
    allocate_buffers,
    check_step,
    contract_feeds,
    sliding_is_full,
    split_outputs,
    zeros_past,
)
from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import ManifestError, read_manifest

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Long prompts are prefilled in chunks of this many tokens (`generate` chunks a prompt of more than two):
# each chunk reads only the keys it can see, where one call computes every query against every key of
# the prompt, masked (benchmarks/inplace/results_prefill_chunk.md)
PREFILL_CHUNK = 256


class _OrtModel:
    """What both contracts' runners share: a session of a g2trt graph, checked against its contract."""

    kv_cache: io.KvCache

    def __init__(
        self,
        model_path: str | Path,
        config: Gemma2Config,
        *,
        name: str = "ort",
        threads: int | None = None,
        optimize: bool = True,
        providers: list[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        flush_denormals: bool = True,
        spin_between_runs: bool = True,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.flush_denormals = flush_denormals  # deploy/runners/denormals.py: why, and on which threads
        # read once (or handed over by a subclass that read it first): requirements, providers, runtime choices
        self.manifest = _manifest(model_path) if manifest is None else manifest
        self.session = open_session(
            model_path, self.manifest, threads, optimize, providers, session_options, flush_denormals,
            spin_between_runs,
        )  # fmt: skip
        check_contract(self.session, config, str(model_path), self.kv_cache)
        self.kv_dtype = cache_dtype(self.session, str(model_path))


class OrtRunner(_OrtModel):
    """The dynamic contract: past in, presents (past + this step) out, as numpy arrays."""

    kv_cache: Literal["dynamic"] = "dynamic"

    def empty_past(self, batch: int) -> KVCache:
        return zeros_past(self.config, batch, self.kv_dtype)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        feeds = contract_feeds(input_ids, attention_mask, position_ids, past)
        with denormals.Flushed(self.flush_denormals):
            return split_outputs(self.session.run(None, feeds))


class OrtInplaceRunner(_OrtModel):
    """The in-place contract on onnxruntime: one buffer bound as both past and present (IOBinding).

    onnxruntime's TensorScatter (and GroupQueryAttention) see the same pointer for past and present and
    write only this step's tokens. Inputs and logits live in arrays bound once per (cache, batch, length),
    so a repeated step shape (decode) costs two small array writes and `run_with_iobinding`: nothing
    allocated, no cache copied, no dict of feeds built per token.

    The logits returned are the bound output array itself: valid until the next step of that shape
    (copy them to keep them).

    `full_sliding`: sliding layers get buffers as long as the global ones, for sequences of at most
    `full_sliding_max` positions (default: what the graph's manifest records, `kv_cache_sliding_full_max`;
    None: any length); longer ones get rings (graph_passes/targets.py says why).

    `decode_graph`: one-token steps on full-length buffers run the graph's one-token form
    (graph_passes/decode_graph.py: no per-layer `If`) in a second session. None = when the graph is an
    `ort` in-place graph whose weights take at most `DECODE_GRAPH_MAX_BYTES`: the second session holds a
    second copy of them, and only on a model that small is the `If`s' time worth it (docs/kv_cache.md).
    The first session's thread pool then stops spinning when its run ends (`SPIN_STOP_KEY`): left
    spinning, it competes with the decode session's pool for the cores through every decode step.

    `prefill_chunk`: what `generate` prefills a long prompt in (`PREFILL_CHUNK`; None: at once).
    """

    kv_cache: Literal["inplace"] = "inplace"

    def __init__(
        self,
        model_path: str | Path,
        config: Gemma2Config,
        *,
        full_sliding: bool = False,
        full_sliding_max: int | Literal["manifest"] | None = "manifest",
        decode_graph: bool | None = None,
        prefill_chunk: int | None = PREFILL_CHUNK,
        **options: Any,
    ) -> None:
        manifest = _manifest(model_path)
        one_token = _one_token_graph(Path(model_path), manifest, decode_graph)
        super().__init__(model_path, config, spin_between_runs=one_token is None, manifest=manifest, **options)
        self.prefill_chunk = prefill_chunk
        self.full_sliding = full_sliding
        if full_sliding_max == "manifest":
            full_sliding_max = self.manifest.get("kv_cache_sliding_full_max")
        self.full_sliding_max: int | None = full_sliding_max
        logits = next(o for o in self.session.get_outputs() if o.name == io.LOGITS)
        self.last_logits_only = logits.shape[1] == 1
        self._bindings: dict[tuple[int, int, int], _Binding] = {}
        self._last: _Binding | None = None  # the binding of the latest one-token step
        self.decode_session = None if one_token is None else _decode_session(one_token, Path(model_path), self.session)

    def allocate(self, batch: int, length: int, ring: int | None = None) -> InplaceCache:
        ring = length if ring is None or sliding_is_full(length, self.full_sliding, self.full_sliding_max) else ring
        return allocate_buffers(self.config, batch, length, ring, lambda shape: np.zeros(shape, self.kv_dtype))

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: InplaceCache) -> np.ndarray:
        check_step(cache, input_ids, position_ids, self.config.sliding_window)
        last = self._last  # a decode loop steps one cache at one shape: no lookup, no address to read
        if last is not None and last.cache is cache and last.input_ids.shape == input_ids.shape:
            binding = last
        else:
            b, s = input_ids.shape
            key = (_address(cache.buffers[0][0]), b, s)
            binding = self._bindings.get(key) or self._bind(cache, b, s)
            if s == 1:  # decode shapes repeat every token; prompt shapes rarely do
                self._bindings[key] = self._last = binding
        binding.input_ids[...] = input_ids
        binding.position_ids[...] = position_ids
        with denormals.Flushed(self.flush_denormals):
            binding.session.run_with_iobinding(binding.io)
        return binding.logits

    def release(self, cache: InplaceCache) -> None:
        """Forget the bindings of `cache` (they keep its buffers alive)."""
        first = _address(cache.buffers[0][0])
        self._bindings = {k: v for k, v in self._bindings.items() if k[0] != first}
        if self._last is not None and _address(self._last.cache.buffers[0][0]) == first:
            self._last = None

    def _bind(self, cache: InplaceCache, b: int, s: int) -> _Binding:
        # The one-token form holds for every step of this key: one token, and on full-length buffers every
        # position the step checks (< length) indexes them unwrapped, as the If's condition requires.
        one_token_form = s == 1 and cache.ring == cache.length
        session = self.decode_session if one_token_form and self.decode_session is not None else self.session
        ids = np.zeros((b, s), dtype=np.int64)
        pos = np.zeros((b, s), dtype=np.int64)
        logits = np.zeros((b, 1 if self.last_logits_only else s, self.config.vocab_size), dtype=np.float32)
        bound = session.io_binding()
        for name, array in ((io.INPUT_IDS, ids), (io.POSITION_IDS, pos)):
            bound.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        bound.bind_output(io.LOGITS, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        for i, (k, v) in enumerate(cache.buffers):
            for kind, buf in (("key", k), ("value", v)):
                if not buf.flags.c_contiguous:
                    raise CacheSizeError("in-place cache buffers must be C-contiguous")
                ptr = buf.ctypes.data
                bound.bind_input(io.past_name(i, kind), "cpu", 0, buf.dtype, buf.shape, ptr)
                bound.bind_output(io.present_name(i, kind), "cpu", 0, buf.dtype, buf.shape, ptr)
        return _Binding(session, bound, ids, pos, logits, cache)


# The per-layer If costs a few µs per layer per step (benchmarks/inplace/results_if_cost.md): a fifth of
# the tiny preset's step (4.5 MB of weights), under 1 % of the medium model's (160 MB). Below this size
# the second copy of the weights the one-token session holds is small and the If's share of a step large.
DECODE_GRAPH_MAX_BYTES = 32 << 20
# onnxruntime's pool threads keep spinning for a while after a run ends (through a tiny model's whole
# decode). With a second session decoding, the first one's pool (idle after the prefill) kept a core busy
# through the decode steps: three busy threads on two cores, and a decode step now and then waited a
# scheduler tick (4 ms) for a core. Measured on the tiny preset, 64 new tokens, one process per run
# (docs/kv_cache.md): the mean decode step 0.21-0.25 ms with the first session stopping, 0.31-0.40 spinning.
SPIN_STOP_KEY = "session.force_spinning_stop"


def _one_token_graph(model_path: Path, manifest: dict[str, Any], wanted: bool | None) -> Any:
    """The graph's one-token form (graph_passes/decode_graph.py, an onnx ModelProto), or None where the
    runner does not use one (`decode_graph`: see OrtInplaceRunner)."""
    if wanted is False:
        return None
    if manifest.get("target") != "ort" or manifest.get("provider", "cpu") != "cpu":
        if wanted:
            raise G2trtError(f"{model_path}: a one-token graph is derived from the `ort` target's CPU form only")
        return None
    data = sum(f.stat().st_size for f in model_path.parent.glob(model_path.name + "*") if f.is_file())
    if wanted is None and data > DECODE_GRAPH_MAX_BYTES:
        return None
    import onnx

    from graph_passes.decode_graph import decode_graph

    # The graph alone: onnxruntime reads the weights from the model's folder, as for the main session
    # (onnx's own loader refuses a data file that `g2trt optimize` hard-linked from the export).
    model = onnx.load(str(model_path), load_external_data=False)
    return model if decode_graph(model) else None


def _decode_session(model: Any, model_path: Path, session: ort.InferenceSession) -> ort.InferenceSession:
    """A session of the one-token graph `model` with the main session's threads, optimization level,
    execution mode and denormal mode, and its pool spinning between runs (decode steps follow each other)."""
    main = session.get_session_options()
    so = ort.SessionOptions()
    for attr in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode",
                 "log_severity_level"):  # fmt: skip
        setattr(so, attr, getattr(main, attr))
    if _config_entry(main, denormals.CONFIG_KEY) == "1":
        denormals.configure(so)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    with denormals.kept_mode():
        return ort.InferenceSession(model.SerializeToString(), so, providers=session.get_providers())


def _config_entry(so: ort.SessionOptions, key: str) -> str | None:
    try:
        return so.get_session_config_entry(key)
    except RuntimeError:  # "does not have configuration with key"
        return None


@dataclasses.dataclass
class _Binding:
    session: ort.InferenceSession
    io: ort.IOBinding
    input_ids: np.ndarray
    position_ids: np.ndarray
    logits: np.ndarray
    cache: InplaceCache  # keeps the bound buffers alive


def _address(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def open_session(
    model_path: str | Path,
    manifest: dict[str, Any],
    threads: int | None,
    optimize: bool,
    providers: list[str] | None,
    session_options: ort.SessionOptions | None,
    flush_denormals: bool = True,
    spin_between_runs: bool = True,
) -> ort.InferenceSession:
    """A session of a g2trt graph: the providers its manifest allows, after checking what it requires. With
    `flush_denormals` its pool threads flush denormals; the creating thread's mode is left as it was.
    Without `spin_between_runs` its pool threads stop spinning when a run ends (`SPIN_STOP_KEY`)."""
    so = session_options or ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if flush_denormals:
        denormals.configure(so)
    if not spin_between_runs:
        so.add_session_config_entry(SPIN_STOP_KEY, "1")
    check_requires(manifest, str(model_path))
    try:
        with denormals.kept_mode():
            if uses_plugin_ops(model_path):
                return plugin_session(model_path, so, providers)
            return ort.InferenceSession(str(model_path), so, providers=providers or providers_for(manifest))
    except (_ort_errors.Fail, _ort_errors.InvalidGraph, _ort_errors.InvalidProtobuf, _ort_errors.NoSuchFile) as e:
        raise G2trtError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None


def cache_dtype(session: ort.InferenceSession, source: str) -> type:
    past_type = {i.name: i.type for i in session.get_inputs()}[io.past_name(0, "key")]
    if past_type not in _NP:
        raise G2trtError(f"{source}: KV cache type {past_type} cannot run on onnxruntime CPU")
    return _NP[past_type]


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime has it (onnxruntime-gpu); onnxruntime falls back to CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def providers_for(manifest: dict[str, Any]) -> list[str]:
    """The providers the graph was lowered for: the CPU form of the `ort` target on CPU only, else CUDA first."""
    if manifest.get("target") == "ort" and manifest.get("provider", "cpu") == "cpu":
        return ["CPUExecutionProvider"]
    return default_providers()


def check_requires(manifest: dict[str, Any], source: str, installed: str | None = None) -> None:
    """One line if this onnxruntime is older than the graph's manifest requires (`requires.onnxruntime`)."""
    from deploy.engine.backend import version_tuple

    spec = str((manifest.get("requires") or {}).get("onnxruntime", ""))
    if not spec:
        return
    if not spec.startswith(">="):
        raise G2trtError(f"{source}: manifest requires onnxruntime {spec!r}; g2trt understands only '>=X.Y[.Z]'")
    installed = installed or ort.__version__
    if version_tuple(installed) < version_tuple(spec[2:]):
        hint = "; lower it again with --provider cuda" if manifest.get("provider", "cpu") == "cpu" else ""
        raise G2trtError(f"{source}: needs onnxruntime {spec}, this is {installed}: upgrade onnxruntime{hint}")


def _manifest(model_path: str | Path) -> dict[str, Any]:
    try:
        return read_manifest(model_path)
    except ManifestError:  # a hand-built graph: no recorded target, provider or requirement
        return {}


def uses_plugin_ops(model_path: str | Path) -> bool:
    """Whether the graph has g2trt plugin nodes (the `trt` target)."""
    import onnx

    from trt_plugins.spec import DOMAIN

    proto = onnx.load(str(model_path), load_external_data=False)
    return any(o.domain == DOMAIN for o in proto.opset_import)


def plugin_session(model_path: str | Path, so: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    """A session whose g2trt plugin nodes run as `trt_plugins.ort_ops` reference ops (CPU, via Python)."""
    try:
        from trt_plugins import ort_ops
    except ImportError as e:
        missing = f"{model_path}: has g2trt plugin nodes but their onnxruntime reference ops are missing ({e})"
        raise G2trtError(missing) from None
    return ort_ops.inference_session(model_path, so, providers or ["CPUExecutionProvider"])


def check_contract(
    session: ort.InferenceSession, cfg: Gemma2Config, source: str, kv_cache: io.KvCache = "dynamic"
) -> None:
    """Fail with one line if the graph's input/output names are not the g2trt contract `kv_cache`."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in in (io.input_names(cfg, c) for c in io.KV_CACHES) and io.contract_of(got_in) != kv_cache:
        raise G2trtError(
            f"{source}: a graph of the {io.contract_of(got_in)} KV cache contract, given to a runner of the "
            f"{kv_cache} one (export with --kv-cache {kv_cache}, or run it with --kv-cache {io.contract_of(got_in)})"
        )
    want_in = io.input_names(cfg, kv_cache)
    for kind, got, want in (("inputs", got_in, want_in), ("outputs", got_out, io.output_names(cfg))):
        if got != want:
            missing = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            raise G2trtError(
                f"{source}: graph {kind} differ from the g2trt contract "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})"
            )

"""A TensorRT (or TensorRT-RTX) engine as a runner, on a CUDA GPU.

Inputs and the KV cache live in torch CUDA tensors whose addresses the execution context reads
(`set_tensor_address`); the cache stays on the GPU between steps (presents are torch tensors, only
ever passed back to this runner), and only the logits are copied to the host. Each call picks the
first optimization profile whose ranges hold the shapes, sets the input shapes, allocates outputs at
the shapes the context infers, and runs `execute_async_v3` on torch's *current* stream: the inputs'
copies and casts, a trimmed window cache and the output allocations are all queued there, so TensorRT
reads nothing before it is written (a separate stream from torch's pool does not wait for them).
Every TensorRT call that can refuse (context creation, profile, input shape, tensor address, enqueue)
is checked, and every I/O tensor must live on the device (a host shape tensor would get a device pointer).

Before any bytes reach TensorRT, the engine's side file (`ENGINE.json`, written by `g2trt build`) is
checked against this runtime and GPU (`deploy.engine.meta.read_checked_engine`): a foreign TensorRT
version, another GPU or a corrupt engine is a one-line error, not a deserialization crash. Both
flavours share this API and are imported lazily (`deploy.engine.backend`), so the module imports on
machines without either. UNVERIFIED: g2trt's development machines have no GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from deploy.runners.base import CacheSizeError, InplaceCache, allocate_buffers, check_step
from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError


class TrtRunnerError(G2trtError, RuntimeError):
    """An engine that cannot run here (no GPU, no runtime, incompatible or not the g2trt contract)."""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def unavailable_reason(backend: str = "auto") -> str | None:
    """Why a TensorRT engine cannot run on this machine, or None when it can."""
    from deploy.engine.backend import resolve_backend

    if not cuda_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        resolve_backend(backend)
    except G2trtError as e:
        return str(e)
    return None


def open_trt_runner(
    engine_path: str | Path, config: Gemma2Config, *, name: str = "trt", kv_cache: io.KvCache | None = None
) -> TrtRunner | TrtInplaceRunner:
    """The runner of the engine's KV cache contract, read from the manifest of the ONNX it was built from."""
    from deploy.engine.meta import load_engine_meta
    from deploy.runners.factory import graph_contract
    from export.manifest import read_manifest

    try:
        contract, full_sliding = graph_contract(read_manifest(Path(load_engine_meta(engine_path).onnx)))
    except G2trtError:  # the ONNX is gone: the dynamic contract unless told otherwise
        contract, full_sliding = kv_cache or "dynamic", True
    if kv_cache is not None and kv_cache != contract:
        raise TrtRunnerError(f"{engine_path}: an engine of the {contract} KV cache contract, but --kv-cache {kv_cache}")
    if contract == "inplace":
        return TrtInplaceRunner(engine_path, config, name=name, full_sliding=full_sliding)
    return TrtRunner(engine_path, config, name=name)


class _TrtEngine:
    """A deserialized engine with its execution context, checked against one KV cache contract."""

    kv_cache: io.KvCache

    def __init__(self, engine_path: str | Path, config: Gemma2Config, *, name: str = "trt") -> None:
        import torch

        from deploy.engine.backend import import_backend, no_gc_inside_tensorrt
        from deploy.engine.gpu_info import local_sm
        from deploy.engine.meta import load_engine_meta, read_checked_engine

        meta = load_engine_meta(engine_path)  # one-line errors for a missing or foreign side file
        if not cuda_available():
            raise TrtRunnerError(f"{engine_path}: cannot run a TensorRT engine: no CUDA GPU on this machine")
        backend = import_backend(meta.backend)  # type: ignore[arg-type]
        data, self.meta = read_checked_engine(engine_path, backend, local_sm())  # version, GPU and bytes
        self.name = name
        self.config = config
        self.trt = trt = backend.trt
        self.logger = backend.logger()
        with no_gc_inside_tensorrt():  # TensorRT logs through Python while holding its locks
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            last = self.logger.errors[-1] if self.logger.errors else "no message"
            raise TrtRunnerError(f"{engine_path}: {backend.label} could not deserialize the engine ({last})")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtRunnerError(f"{engine_path}: {backend.label} could not create an execution context (GPU memory?)")
        self.device = _device()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        on_host = [n for n in names if self.engine.get_tensor_location(n) != trt.TensorLocation.DEVICE]
        if on_host:
            raise TrtRunnerError(f"{engine_path}: engine tensor(s) {on_host[:3]} live on the host (shape tensors?)")
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        want = io.input_names(config, self.kv_cache)
        if sorted(inputs) != sorted(want) and sorted(inputs) in (
            sorted(io.input_names(config, c)) for c in io.KV_CACHES
        ):
            other = "dynamic" if self.kv_cache == "inplace" else "inplace"
            raise TrtRunnerError(
                f"{engine_path}: an engine of the {other} KV cache contract, given to a {self.kv_cache} runner"
            )
        contract = (("inputs", inputs, want), ("outputs", outputs, io.output_names(config)))
        for kind, got, want in contract:
            if sorted(got) != sorted(want):
                missing = sorted(set(want) - set(got))[:3]
                raise TrtRunnerError(f"{engine_path}: engine {kind} differ from the g2trt contract (missing {missing})")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.kv_dtype = self.dtypes[io.past_name(0, "key")]
        self._profile = -1
        self._dummy = torch.zeros(1, dtype=torch.float32, device=self.device)  # address for empty tensors

    def _shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise TrtRunnerError(f"TensorRT refused input shape {name}={shape} (see its log)")

    def _execute(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise TrtRunnerError("TensorRT execute_async_v3 failed (see its log above)")

    def _address(self, name: str, t: Any) -> None:
        if not self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr()):
            raise TrtRunnerError(f"TensorRT refused the address of {name} (see its log)")

    def _device(self, a: Any, name: str) -> Any:
        """`a` (numpy, or a tensor this runner returned) as a contiguous CUDA tensor of the engine's type."""
        import torch

        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=self.device, dtype=self.dtypes[name], non_blocking=True).contiguous()

    def _select_profile(self, shapes: dict[str, tuple[int, ...]], stream: int) -> None:
        """The side file's named profile for this step (prefill / decode) if it holds the shapes, else any."""
        names = [p.get("name") for p in self.meta.profiles]
        wanted = "decode" if shapes[io.INPUT_IDS][1] == 1 else "prefill"
        order = list(range(self.engine.num_optimization_profiles))
        if wanted in names:
            order.remove(names.index(wanted))
            order.insert(0, names.index(wanted))
        for p in order:
            if all(_within(self.engine.get_tensor_profile_shape(n, p), s) for n, s in shapes.items()):
                if p != self._profile:
                    if not self.context.set_optimization_profile_async(p, stream):
                        raise TrtRunnerError(f"TensorRT refused optimization profile {p} (see its log)")
                    self._profile = p
                return
        raise TrtRunnerError(
            "no optimization profile of the engine holds input shapes "
            + ", ".join(f"{n}={s}" for n, s in list(shapes.items())[:3])
            + " (rebuild with larger --max-batch / --max-seq)"
        )


class TrtRunner(_TrtEngine):
    """The dynamic contract: presents are new device tensors each step (past + this step)."""

    kv_cache: Literal["dynamic"] = "dynamic"

    def empty_past(self, batch: int) -> list[tuple[Any, Any]]:
        import torch

        cfg = self.config
        z = torch.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=self.kv_dtype, device=self.device)
        return [(z, z) for _ in range(cfg.num_hidden_layers)]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[tuple[Any, Any]]
    ) -> tuple[np.ndarray, list[tuple[Any, Any]]]:
        import torch

        feeds: dict[str, torch.Tensor] = {
            io.INPUT_IDS: self._device(input_ids, io.INPUT_IDS),
            io.ATTENTION_MASK: self._device(attention_mask, io.ATTENTION_MASK),
            io.POSITION_IDS: self._device(position_ids, io.POSITION_IDS),
        }
        for i, (k, v) in enumerate(past):
            feeds[io.past_name(i, "key")] = self._device(k, io.past_name(i, "key"))
            feeds[io.past_name(i, "value")] = self._device(v, io.past_name(i, "value"))
        stream = torch.cuda.current_stream(self.device)  # where the feeds above were queued
        self._select_profile({n: tuple(t.shape) for n, t in feeds.items()}, stream.cuda_stream)
        ctx = self.context
        for name, t in feeds.items():
            self._shape(name, tuple(t.shape))
            self._address(name, t)
        outs: dict[str, torch.Tensor] = {}
        for name in io.output_names(self.config):
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtRunnerError(f"engine could not infer the shape of {name} ({shape})")
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            outs[name] = t
            self._address(name, t)
        self._execute(stream.cuda_stream)
        stream.synchronize()
        logits = outs[io.LOGITS].float().cpu().numpy()
        n = self.config.num_hidden_layers
        presents = [(outs[io.present_name(i, "key")], outs[io.present_name(i, "value")]) for i in range(n)]
        return logits, presents


class TrtInplaceRunner(_TrtEngine):
    """The in-place contract: the cache is allocated once on the device and bound as past and present.

    TensorRT's KV-cache update layer (trt-native) and the in-place plugin (trt) write these buffers where
    they are; the engine fixed their length at build, so `allocate` gives exactly that many slots.
    Device inputs, the logits and their pinned host copy are allocated once per (cache, batch, step
    length); a repeated step shape (decode) sets no address and allocates nothing, which is what lets
    `capture_decode=True` replay it from a CUDA graph. UNVERIFIED: no GPU on the development machines.
    """

    kv_cache: Literal["inplace"] = "inplace"

    def __init__(
        self,
        engine_path: str | Path,
        config: Gemma2Config,
        *,
        name: str = "trt",
        full_sliding: bool = True,
        capture_decode: bool = False,
    ) -> None:
        super().__init__(engine_path, config, name=name)
        self.full_sliding = full_sliding
        self.full_sliding_max: int | None = None  # the engine fixed its cache lengths
        self.prefill_chunk: int | None = None  # not measured (no GPU here): a long prompt goes at once
        self.capture_decode = capture_decode
        self.length, self.ring = self._static_lengths(str(engine_path))
        self._bindings: dict[tuple[int, int, int], _DeviceStep] = {}
        self._bound: tuple[int, int, int] | None = None

    def _static_lengths(self, source: str) -> tuple[int, int]:
        """The cache lengths the engine fixed (global layers, sliding layers)."""
        lengths: dict[str, int] = {}
        for i, kind in enumerate(self.config.layer_types):
            lengths.setdefault(kind, int(self.engine.get_tensor_shape(io.past_name(i, "key"))[2]))
        if any(n < 1 for n in lengths.values()):
            raise TrtRunnerError(f"{source}: the engine's cache length is not static (build with --max cache=N)")
        length = lengths.get("full_attention", max(lengths.values()))
        return length, lengths.get("sliding_attention", length)

    def last_logits_only(self) -> bool:
        """Whether the engine's logits hold the last position only ([B, 1, V])."""
        return int(self.engine.get_tensor_shape(io.LOGITS)[1]) == 1

    def allocate(self, batch: int, length: int, ring: int | None = None) -> InplaceCache:
        import torch

        if length > self.length:
            raise CacheSizeError(
                f"a cache of {length} positions; this engine was built for {self.length} (g2trt build --max cache=N)"
            )

        def zeros(shape: tuple[int, ...]) -> Any:
            return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

        return allocate_buffers(self.config, batch, self.length, self.ring, zeros)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: InplaceCache) -> np.ndarray:
        import torch

        check_step(cache, input_ids, position_ids, self.config.sliding_window)
        b, s = input_ids.shape
        key = (int(cache.buffers[0][0].data_ptr()), b, s)
        bound = self._bindings.get(key)
        if bound is None:
            bound = _DeviceStep.allocate(self, cache, b, s)
            if s == 1:
                self._bindings[key] = bound
        stream = torch.cuda.current_stream(self.device)
        bound.ids_host.numpy()[...] = input_ids
        bound.pos_host.numpy()[...] = position_ids
        if self._bound != key:  # shapes, profile and addresses are the context's state: set on a change only
            self._bind(bound, stream.cuda_stream)
            self._bound = key
        if bound.graph is not None:
            bound.graph.replay()
        else:
            bound.run(self, stream.cuda_stream)
            if self.capture_decode and s == 1 and bound.warm:
                bound.capture(self)
            bound.warm = True
        stream.synchronize()
        return bound.logits_host.numpy()

    def release(self, cache: InplaceCache) -> None:
        first = int(cache.buffers[0][0].data_ptr())
        self._bindings = {k: v for k, v in self._bindings.items() if k[0] != first}
        self._bound = None

    def _bind(self, bound: _DeviceStep, stream: int) -> None:
        shapes = {io.INPUT_IDS: bound.ids.shape, io.POSITION_IDS: bound.pos.shape}
        for i, (k, v) in enumerate(bound.cache.buffers):
            shapes[io.past_name(i, "key")], shapes[io.past_name(i, "value")] = k.shape, v.shape
        self._select_profile({n: tuple(sh) for n, sh in shapes.items()}, stream)
        for name, sh in shapes.items():
            self._shape(name, tuple(sh))
        self._address(io.INPUT_IDS, bound.ids)
        self._address(io.POSITION_IDS, bound.pos)
        self._address(io.LOGITS, bound.logits)
        for i, (k, v) in enumerate(bound.cache.buffers):  # present is past: the same device memory
            for kind, t in (("key", k), ("value", v)):
                self._address(io.past_name(i, kind), t)
                self._address(io.present_name(i, kind), t)


class _DeviceStep:
    """The device side of one step shape: inputs, logits, their host copies, and optionally a CUDA graph."""

    def __init__(self, cache: InplaceCache, ids: Any, pos: Any, logits: Any, hosts: tuple[Any, Any, Any]) -> None:
        self.cache, self.ids, self.pos, self.logits = cache, ids, pos, logits
        self.ids_host, self.pos_host, self.logits_host = hosts
        self.graph: Any = None
        self.warm = False

    @classmethod
    def allocate(cls, runner: TrtInplaceRunner, cache: InplaceCache, b: int, s: int) -> _DeviceStep:
        import torch

        rows = 1 if runner.last_logits_only() else s
        dev = runner.device
        ids = torch.zeros((b, s), dtype=runner.dtypes[io.INPUT_IDS], device=dev)
        pos = torch.zeros((b, s), dtype=runner.dtypes[io.POSITION_IDS], device=dev)
        logits = torch.zeros((b, rows, runner.config.vocab_size), dtype=runner.dtypes[io.LOGITS], device=dev)
        pinned = torch.cuda.is_available()
        hosts = (
            torch.zeros((b, s), dtype=torch.int64, pin_memory=pinned),
            torch.zeros((b, s), dtype=torch.int64, pin_memory=pinned),
            torch.zeros((b, rows, runner.config.vocab_size), dtype=torch.float32, pin_memory=pinned),
        )
        return cls(cache, ids, pos, logits, hosts)

    def run(self, runner: TrtInplaceRunner, stream: int) -> None:
        """Host inputs to the device, the engine, the logits back: all queued on `stream` (torch's current)."""
        self.ids.copy_(self.ids_host, non_blocking=True)
        self.pos.copy_(self.pos_host, non_blocking=True)
        runner._execute(stream)
        self.logits_host.copy_(self.logits, non_blocking=True)

    def capture(self, runner: TrtInplaceRunner) -> None:
        """Record the step once warm (TensorRT's lazy allocations done); later steps replay it."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run(runner, torch.cuda.current_stream(runner.device).cuda_stream)
        self.graph = graph


def _device() -> Any:
    import torch

    return torch.device("cuda")


def _within(profile: Any, shape: tuple[int, ...]) -> bool:
    lo, _, hi = (tuple(x) for x in profile)
    return len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))


def _torch_dtype(trt: Any, dt: Any) -> Any:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
    }
    if dt not in table:
        raise TrtRunnerError(f"engine tensor type {dt} is not supported by the g2trt runner")
    return table[dt]

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


class TrtRunner:
    kv_cache: Literal["dynamic"] = "dynamic"

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
        contract = (("inputs", inputs, io.input_names(config)), ("outputs", outputs, io.output_names(config)))
        for kind, got, want in contract:
            if sorted(got) != sorted(want):
                missing = sorted(set(want) - set(got))[:3]
                raise TrtRunnerError(f"{engine_path}: engine {kind} differ from the g2trt contract (missing {missing})")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.kv_dtype = self.dtypes[io.past_name(0, "key")]
        self._profile = -1
        self._dummy = torch.zeros(1, dtype=torch.float32, device=self.device)  # address for empty tensors

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
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise TrtRunnerError(f"TensorRT refused input shape {name}={tuple(t.shape)} (see its log)")
            self._address(name, t)
        outs: dict[str, torch.Tensor] = {}
        for name in io.output_names(self.config):
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TrtRunnerError(f"engine could not infer the shape of {name} ({shape})")
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            outs[name] = t
            self._address(name, t)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TrtRunnerError("TensorRT execute_async_v3 failed (see its log above)")
        stream.synchronize()
        logits = outs[io.LOGITS].float().cpu().numpy()
        n = self.config.num_hidden_layers
        presents = [(outs[io.present_name(i, "key")], outs[io.present_name(i, "value")]) for i in range(n)]
        return logits, presents

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

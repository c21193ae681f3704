"""The TensorRT runner's calls, in order, against a recording stand-in for TensorRT and torch's CUDA streams.

No GPU here: the engine, its execution context and the streams are stand-ins that record every call and
the stream handle it was given; tensors stay on the CPU. What is checked is the runner's own logic: every
stream TensorRT is handed is ordered after the stream the inputs were queued on (torch's current one),
the profile is chosen per step, and every TensorRT call that can refuse is checked.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch

from deploy.runners import trt_runner
from deploy.runners.trt_runner import TrtRunner, TrtRunnerError
from export import io_contract as io
from export.config import preset

CFG = preset("tiny").replace(num_hidden_layers=2, vocab_size=64)
CURRENT = 7  # the handle of torch's current stream (where the runner's input copies and casts are queued)


class Stream:
    handles = iter(range(100, 1000))

    def __init__(self, log: list, handle: int | None = None) -> None:
        self.log, self.cuda_stream = log, handle if handle is not None else next(self.handles)

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.cuda_stream))

    def wait_stream(self, other: Stream) -> None:
        self.log.append(("wait_stream", self.cuda_stream, other.cuda_stream))


class Context:
    def __init__(self, log: list, refuse: str | None) -> None:
        self.log, self.refuse, self.shapes, self.addresses = log, refuse, {}, {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.log.append(("set_input_shape", name))
        self.shapes[name] = shape
        return self.refuse != "set_input_shape"

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.log.append(("set_tensor_address", name))
        self.addresses[name] = ptr
        return self.refuse != "set_tensor_address"

    def set_optimization_profile_async(self, p: int, stream: int) -> bool:
        self.log.append(("set_optimization_profile_async", p, stream))
        return self.refuse != "set_optimization_profile_async"

    def get_tensor_shape(self, name: str) -> tuple:
        b, s = self.shapes[io.INPUT_IDS]
        if name == io.LOGITS:
            return (b, s, CFG.vocab_size)
        layer = int(name.split(".")[1])
        p = self.shapes[io.past_name(layer, "key")][2]
        return (b, CFG.num_key_value_heads, p + s, CFG.head_dim)

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append(("execute_async_v3", stream))
        return True


CACHE = 48  # the in-place engine's static cache length


def fake_trt(
    log: list,
    *,
    host: str | None = None,
    refuse: str | None = None,
    no_context: bool = False,
    kv_cache: str = "dynamic",
) -> Any:
    names = io.input_names(CFG, kv_cache) + io.output_names(CFG)
    DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", BF16="bf16", INT64="i64", INT32="i32")
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    TensorLocation = types.SimpleNamespace(DEVICE="device", HOST="host")
    big = (8, 64, 512)  # batch, seq, past maxima of both profiles

    class Engine:
        num_io_tensors = len(names)
        num_optimization_profiles = 2

        def get_tensor_name(self, i: int) -> str:
            return names[i]

        def get_tensor_mode(self, n: str) -> str:
            return TensorIOMode.INPUT if n in io.input_names(CFG, kv_cache) else TensorIOMode.OUTPUT

        def get_tensor_shape(self, n: str) -> tuple:
            if n == io.LOGITS:
                return (-1, -1, CFG.vocab_size)
            return (-1, CFG.num_key_value_heads, CACHE if kv_cache == "inplace" else -1, CFG.head_dim)

        def get_tensor_dtype(self, n: str) -> str:
            return DataType.INT64 if n in (io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS) else DataType.FLOAT

        def get_tensor_location(self, n: str) -> str:
            return TensorLocation.HOST if n == host else TensorLocation.DEVICE

        def get_tensor_profile_shape(self, n: str, p: int) -> list:
            seq = (2, 64) if p == 0 else (1, 1)  # prefill, decode
            if n in (io.INPUT_IDS, io.POSITION_IDS):
                return [(1, seq[0]), (1, seq[0]), (big[0], seq[1])]
            if n == io.ATTENTION_MASK:
                return [(1, seq[0]), (1, seq[0]), (big[0], big[2] + seq[1])]
            d = (CFG.num_key_value_heads, CFG.head_dim)
            if kv_cache == "inplace":
                return [(1, d[0], CACHE, d[1]), (1, d[0], CACHE, d[1]), (big[0], d[0], CACHE, d[1])]
            return [(1, d[0], 0, d[1]), (1, d[0], 0, d[1]), (big[0], d[0], big[2], d[1])]

        def create_execution_context(self) -> Context | None:
            return None if no_context else Context(log, refuse)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    return types.SimpleNamespace(
        Runtime=Runtime, DataType=DataType, TensorIOMode=TensorIOMode, TensorLocation=TensorLocation
    )


@pytest.fixture
def make_runner(monkeypatch: pytest.MonkeyPatch):
    """`make_runner(**fake_trt options)` -> (TrtRunner over the stand-ins, the call log)."""
    import deploy.engine.backend as backend
    import deploy.engine.gpu_info as gpu_info
    import deploy.engine.meta as meta

    def make(runner: type = TrtRunner, **options: Any) -> tuple[Any, list]:
        log: list = []
        trt = fake_trt(log, **{"kv_cache": runner.kv_cache, **options})
        fake_backend = types.SimpleNamespace(
            trt=trt, label="TensorRT 11.4.0", logger=lambda: types.SimpleNamespace(errors=[])
        )
        profiles = ({"name": "prefill"}, {"name": "decode"})
        monkeypatch.setattr(trt_runner, "cuda_available", lambda: True)
        monkeypatch.setattr(trt_runner, "_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(meta, "load_engine_meta", lambda path: types.SimpleNamespace(backend="tensorrt"))
        monkeypatch.setattr(
            meta, "read_checked_engine", lambda path, b, sm: (b"", types.SimpleNamespace(profiles=profiles))
        )
        monkeypatch.setattr(backend, "import_backend", lambda name: fake_backend)
        monkeypatch.setattr(gpu_info, "local_sm", lambda: 89)
        current = Stream(log, CURRENT)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: Stream(log))  # torch's pool: another stream
        return runner("model.engine", CFG), log

    return make


def ordered_after_current(log: list) -> None:
    """Every stream handle given to TensorRT is the current stream, or one that waited on it first."""
    waited: set[int] = set()
    for entry in log:
        if entry[0] == "wait_stream" and entry[2] == CURRENT:
            waited.add(entry[1])
        if entry[0] in ("set_optimization_profile_async", "execute_async_v3"):
            handle = entry[-1]
            assert handle == CURRENT or handle in waited, f"{entry[0]} on stream {handle}, not ordered after {CURRENT}"


def step(runner: TrtRunner, ids: np.ndarray, mask: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)[:, -ids.shape[1] :]
    return runner.forward(ids, mask, pos, past)


def test_prefill_then_decode_run_in_order_on_the_stream_the_inputs_were_queued_on(make_runner):
    runner, log = make_runner()
    ids = np.ones((2, 5), np.int64)
    mask = np.ones((2, 5), np.int64)
    logits, past = step(runner, ids, mask, runner.empty_past(2))
    assert logits.shape == (2, 5, CFG.vocab_size) and past[0][0].shape == (2, CFG.num_key_value_heads, 5, 32)
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    step(runner, ids[:, :1], mask, past)
    ordered_after_current(log)
    calls = [e[0] for e in log]
    assert [e for e in log if e[0] == "set_optimization_profile_async"] == [
        ("set_optimization_profile_async", 0, CURRENT),  # prefill
        ("set_optimization_profile_async", 1, CURRENT),  # decode
    ]
    first_exec = calls.index("execute_async_v3")
    # shapes and addresses of every input and output are set before the enqueue; the host waits after it
    assert calls[:first_exec].count("set_input_shape") == len(io.input_names(CFG))
    assert calls[:first_exec].count("set_tensor_address") == len(io.input_names(CFG)) + len(io.output_names(CFG))
    assert log[first_exec + 1] == ("synchronize", CURRENT)
    assert calls.count("execute_async_v3") == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"host": io.ATTENTION_MASK}, r"tensor\(s\) \['attention_mask'\] live on the host"),
        ({"no_context": True}, "could not create an execution context"),
    ],
)
def test_engines_the_runner_cannot_drive_are_refused_at_load(make_runner, options, message):
    with pytest.raises(TrtRunnerError, match=message):
        make_runner(**options)


@pytest.mark.parametrize("call", ["set_input_shape", "set_tensor_address", "set_optimization_profile_async"])
def test_a_refused_tensorrt_call_is_an_error_not_a_silent_wrong_run(make_runner, call):
    runner, log = make_runner(refuse=call)
    with pytest.raises(TrtRunnerError, match="TensorRT refused"):
        step(runner, np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), runner.empty_past(1))
    assert "execute_async_v3" not in [e[0] for e in log]


# The in-place contract: one device cache bound as past and present, nothing set or allocated per decode step.


def test_inplace_binds_present_to_past_and_decodes_without_rebinding(make_runner):
    from deploy.runners.trt_runner import TrtInplaceRunner

    runner, log = make_runner(TrtInplaceRunner)
    cache = runner.allocate(2, 20)
    assert cache.length == CACHE and cache.buffers[0][0].shape == (2, CFG.num_key_value_heads, CACHE, CFG.head_dim)
    runner.step(np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)), cache)
    ctx = runner.context
    for i, (k, v) in enumerate(cache.buffers):  # present is past: TensorRT writes the cache where it is
        assert ctx.addresses[io.present_name(i, "key")] == ctx.addresses[io.past_name(i, "key")] == k.data_ptr()
        assert ctx.addresses[io.present_name(i, "value")] == ctx.addresses[io.past_name(i, "value")] == v.data_ptr()
    for position in (5, 6, 7):
        runner.step(np.ones((2, 1), np.int64), np.full((2, 1), position), cache)
    ordered_after_current(log)
    calls = [e[0] for e in log]
    first_decode = [i for i, e in enumerate(log) if e[0] == "execute_async_v3"][1]
    setup = calls[calls.index("execute_async_v3") + 1 : first_decode]
    assert setup.count("set_tensor_address") == 3 + 4 * CFG.num_hidden_layers  # once, for the decode shape
    after = calls[first_decode + 1 :]
    assert "set_tensor_address" not in after and "set_input_shape" not in after  # steps 2 and 3 only run
    assert after.count("execute_async_v3") == 2
    assert len(runner._bindings) == 1  # one decode binding, reused


def test_inplace_engine_sizes_and_contract(make_runner):
    from deploy.runners.base import CacheSizeError
    from deploy.runners.trt_runner import TrtInplaceRunner

    runner, _ = make_runner(TrtInplaceRunner)
    with pytest.raises(CacheSizeError, match=f"this engine was built for {CACHE}"):
        runner.allocate(1, CACHE + 1)
    with pytest.raises(TrtRunnerError, match="an engine of the inplace KV cache contract, given to a dynamic runner"):
        make_runner(TrtRunner, kv_cache="inplace")

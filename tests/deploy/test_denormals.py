"""Denormals flushed while onnxruntime runs (deploy/runners/denormals.py): on the pool threads and the
calling thread during a run, no thread's mode changed after it, and no logit moved."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from deploy.runners import denormals
from deploy.runners.base import padded_positions
from deploy.runners.ort_runner import OrtInplaceRunner


@pytest.fixture(autouse=True)
def mode_off():
    """Each test starts with this thread not flushing, and leaves it so."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def _halving_session(flush: bool) -> ort.InferenceSession:
    """y = x * 0.5: a denormal when x is fp32's smallest normals, 0 when flushed."""
    node = helper.make_node("Mul", ["x", "half"], ["y"])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph(
        [node], "halve", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [half],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if flush:
        denormals.configure(so)
    with denormals.kept_mode():
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_flush_sets_the_mode_for_a_run_and_restore_undoes_only_its_own_change():
    x = np.full(4, 1e-38, np.float32)
    session = _halving_session(flush=True)
    assert not denormals.flushing(), "creating the session left its mode on this thread"
    assert session.run(None, {"x": x})[0][0] > 0  # unflushed caller: a denormal result
    undo = denormals.flush()
    assert undo and denormals.flushing()
    assert session.run(None, {"x": x})[0][0] == 0
    denormals.restore(undo)
    assert not denormals.flushing()
    with denormals.Flushed():
        assert session.run(None, {"x": x})[0][0] == 0
    with denormals.Flushed(False):
        assert not denormals.flushing()
    assert not denormals.flushing()
    # a thread already flushing keeps its mode: flush() reports nothing to undo
    torch.set_flush_denormal(True)
    undo = denormals.flush()
    denormals.restore(undo)
    assert not undo and denormals.flushing()
    with denormals.Flushed():
        pass
    assert denormals.flushing()


def test_runner_flushes_its_runs_and_leaves_every_thread_as_it_found_it(runtime_inplace_export, runtime_cfg):
    path = runtime_inplace_export.model_path
    flushed = OrtInplaceRunner(path, runtime_cfg, threads=2)
    plain = OrtInplaceRunner(path, runtime_cfg, threads=2, flush_denormals=False)
    assert flushed.session.get_session_options().get_session_config_entry(denormals.CONFIG_KEY) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        plain.session.get_session_options().get_session_config_entry(denormals.CONFIG_KEY)
    assert not denormals.flushing()

    # left padding: whole masked rows and columns, whose softmax terms underflow
    lengths = [12, 3]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, runtime_cfg.vocab_size, (2, 12))
    pos = padded_positions(lengths, 12)
    logits = {}
    for name, runner in (("flushed", flushed), ("plain", plain)):
        cache = runner.allocate(2, 16)
        logits[name] = np.array(runner.step(ids, pos, cache))
        assert not denormals.flushing(), f"{name} runner left the mode on the calling thread"

    other: list[bool] = []

    def step_elsewhere() -> None:  # a server's thread: flushed during the run, unflushed after
        cache = flushed.allocate(2, 16)
        logits["thread"] = np.array(flushed.step(ids, pos, cache))
        other.append(denormals.flushing())

    worker = threading.Thread(target=step_elsewhere)
    worker.start()
    worker.join()
    assert other == [False]
    np.testing.assert_allclose(logits["flushed"], logits["plain"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(logits["thread"], logits["flushed"])


def test_the_mode_is_set_without_torch_where_glibc_can(monkeypatch):
    """On x86-64 Linux the mode goes through glibc's fegetmode/fesetmode (checked once against an fp32
    product); elsewhere, or where that does not take, through torch."""
    import platform
    import sys

    monkeypatch.setattr(denormals, "_setter", None)
    undo = denormals.flush()
    assert undo and denormals.flushing()
    denormals.restore(undo)
    assert not denormals.flushing()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert denormals._setter is not denormals._torch_setter
    monkeypatch.setattr(denormals, "_setter", None)
    monkeypatch.setattr(denormals, "_mxcsr_setter", lambda: None)
    with denormals.Flushed():
        assert denormals.flushing()
    assert not denormals.flushing() and denormals._setter is denormals._torch_setter

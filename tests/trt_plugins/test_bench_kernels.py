"""benchmarks/kernels/bench_kernels.py on a CPU: only host-sync-free Triton launches are timed from a CUDA
graph, and the SDPA baseline's timed call never waits on the host.

On a GPU, capturing a function that synchronizes with the host (a pageable `.to(device)`, `bool(tensor)`)
aborts the capture; the first version captured the eager reference and the SDPA baseline and stopped at the
first attention case. Here the smoke run (TRITON_INTERPRET=1) records which timer each row would get on a
GPU, and the SDPA closure runs under a check that fails on any host synchronization torch can see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernels" / "bench_kernels.py"


class NoHostSync(TorchFunctionMode):
    """Fails on what makes the host wait for the device: reading a value back or copying to the host."""

    SYNCS = frozenset(
        {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"host synchronization inside a timed call: {func.__name__}")
        return func(*args, **(kwargs or {}))


def load_script(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_only_triton_launches_are_timed_from_a_cuda_graph(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["op"] for r in rows} == {"SoftCap", "SandwichRMSNorm", "SlidingWindowAttention"}
    for r in rows:
        want = "cudagraph" if r["variant"].startswith("triton") else "events"
        assert r["timer"] == want, r
        assert r["median_ms"] is not None, r  # every variant ran
    assert any(r["variant"].startswith("torch SDPA") for r in rows)


@pytest.mark.parametrize(("s", "p", "window"), [(16, 0, 0), (16, 0, 8), (1, 15, 8)])
def test_sdpa_baseline_does_not_synchronize_inside_the_timed_call(s: int, p: int, window: int, monkeypatch) -> None:
    bench = load_script(monkeypatch)
    q = torch.randn(1, 4, s, 32)
    k, v = torch.randn(1, 2, s, 32), torch.randn(1, 2, s, 32)
    pk, pv = torch.randn(1, 2, p, 32), torch.randn(1, 2, p, 32)
    mask = torch.ones(1, p + s, dtype=torch.int64)
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 32, "scale": 32**-0.5, "softcap": 0.0, "window": window}
    timed = bench.sdpa_baseline(q, mask, p, window)  # the mask and the causal choice: made before timing
    with NoHostSync():
        out, present_k, _ = timed(q, k, v, pk, pv, mask, **attrs)
    assert out.shape == q.shape and present_k.shape[2] == p + s
    from trt_plugins import attention

    ref, _, _ = attention.reference(q, k, v, pk, pv, mask, **attrs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # same math without a soft-cap


def test_the_sync_check_bites() -> None:
    with NoHostSync(), pytest.raises(AssertionError, match="__bool__"):
        bool(torch.ones(2).all())

"""The recorded TensorRT-RTX experiment (docs/build.md): g2trt's plugins registered through TensorRT-RTX's
Python IPluginV3 API abort the process while the ONNX parser adds the first plugin node.

This asserts today's behaviour (TensorRT-RTX 1.7.1): when a release changes it, this test fails, and
docs/build.md and `deploy.engine.build`'s refusal of plugin graphs on TensorRT-RTX need revisiting."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from deploy.engine.backend import import_backend
from tests.deploy.build_graphs import contract_graph, optimized, softcap_graph
from trt_plugins.registration.rtx_probe import run_probe


@pytest.fixture(scope="module")
def rtx_version() -> str:
    return import_backend("tensorrt-rtx").version


def test_probe_reaches_built_without_plugins(tmp_path: Path):
    """The probe itself works: with no plugin node, every stage is reached and the process exits 0."""
    result = run_probe(contract_graph(tmp_path / "plain.onnx"), sm=80)
    assert result.returncode == 0, result.describe()
    assert result.stages[:3] == ("imported", "registered", "parsed") and result.stages[3].startswith("built ")
    assert result.calls == ()


def test_python_plugin_aborts_tensorrt_rtx(tmp_path: Path, rtx_version: str):
    result = run_probe(softcap_graph(tmp_path / "softcap.onnx"), sm=89)
    if not rtx_version.startswith("1.7."):
        pytest.fail(f"TensorRT-RTX {rtx_version}: re-run the experiment and update docs/build.md: {result.describe()}")
    assert result.returncode == -signal.SIGABRT, result.describe()
    assert result.stages == ("imported", "registered"), result.describe()  # never "parsed"
    assert result.calls == ("SoftCap.create_plugin",), result.describe()  # no IPluginV3 method is ever reached
    assert "terminate called without an active exception" in result.stderr_tail


def test_tiny_trt_target_aborts_at_its_first_plugin(tiny_export, tmp_path: Path, rtx_version: str):
    """The real thing: the tiny model's `trt` graph (8 SandwichRMSNorm, 4 SlidingWindowAttention, 1 SoftCap)."""
    model = optimized(tiny_export("fp32").model_path, "trt", tmp_path / "trt")
    result = run_probe(model, sm=89)
    if not rtx_version.startswith("1.7."):
        pytest.fail(f"TensorRT-RTX {rtx_version}: re-run the experiment and update docs/build.md: {result.describe()}")
    assert result.returncode == -signal.SIGABRT, result.describe()
    assert result.stages == ("imported", "registered"), result.describe()
    assert len(result.calls) == 1 and result.calls[0].endswith(".create_plugin"), result.describe()

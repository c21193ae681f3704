"""TensorRT calls the Python logger while holding its own locks; a garbage collection inside that callback
can free an earlier TensorRT object whose destructor takes the same lock (a deadlock seen in CI). So
`build_engine` keeps the collector off whenever TensorRT may call back, and collects after."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from deploy.engine import backend as trt_backend
from deploy.engine.build import BuildOptions, build_engine
from tests.deploy.build_graphs import contract_graph


def test_no_collection_can_run_inside_tensorrt_callbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    original = trt_backend.make_logger

    def recording_logger(trt: Any, echo: bool = False) -> Any:
        inner = original(trt, echo)

        class Recording(trt.ILogger):  # type: ignore[misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors, self.warnings = inner.errors, inner.warnings

            def log(self, level: Any, msg: str) -> None:
                seen.append(gc.isenabled())
                inner.log(level, msg)

        return Recording()

    monkeypatch.setattr(trt_backend, "make_logger", recording_logger)
    assert gc.isenabled()
    build_engine(
        contract_graph(tmp_path / "model.onnx"), tmp_path / "model.engine", BuildOptions("tensorrt-rtx", (89,))
    )
    assert seen and not any(seen), seen  # TensorRT called back, never with the collector on
    assert gc.isenabled()  # and it is back on afterwards

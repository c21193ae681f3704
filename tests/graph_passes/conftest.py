"""Fixtures shared by the pass tests: the exported tiny model's graph (session-cached)."""

from __future__ import annotations

import onnx
import pytest


@pytest.fixture(scope="session")
def tiny_proto(tiny_export) -> onnx.ModelProto:
    """The fp32 tiny export's graph; its weights are read from beside the export when run."""
    return onnx.load(str(tiny_export("fp32").model_path), load_external_data=False)

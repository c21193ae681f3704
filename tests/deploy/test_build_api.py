"""The TensorRT API surface deploy.engine.build is type-checked against (deploy/engine/trt_api.py) exists in the
installed TensorRT-RTX: a renamed or removed member fails here, not in a user's build."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.engine.backend import import_backend
from deploy.engine.trt_api import CLASSES


def members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return names


@pytest.mark.parametrize("protocol", list(CLASSES), ids=lambda p: p.__name__)
def test_protocol_members_exist_in_tensorrt_rtx(protocol: type):
    trt = import_backend("tensorrt-rtx").trt
    cls = getattr(trt, CLASSES[protocol])
    missing = sorted(m for m in members(protocol) if not hasattr(cls, m))
    assert not missing, f"{CLASSES[protocol]} lacks {missing}"
    assert members(protocol)


# What g2trt calls on the full TensorRT beyond the build Protocols and the runner (scanned below): module
# members, enum values and the plugin registration's needs.
FULL_TENSORRT_CALLS = (
    # deploy/engine/build.py, backend.py
    "Builder", "OnnxParser", "ILogger", "IStreamWriter", "Runtime", "NetworkDefinitionCreationFlag",
    "STRONGLY_TYPED", "ProfilingVerbosity", "DETAILED", "LayerInformationFormat", "create_engine_inspector",
    "get_engine_information", "deserialize_cuda_engine", "INTERNAL_ERROR",
    # trt_plugins/registration/tensorrt_qdp.py (tensorrt.plugin's AOT path needs QuickPluginCreationRequest)
    "QuickPluginCreationRequest", "IPluginV3QuickAOTBuild", "float32", "float16", "bfloat16", "int64",
)  # fmt: skip


RTX_ONLY = {"num_compute_capabilities", "set_compute_capability"}  # ahead-of-time targets (TrtBackend.apply_targets)
TENSORRT_OBJECTS = {"trt", "ctx", "engine", "context", "runtime"}  # what the runner names TensorRT's objects


def runner_calls() -> set[str]:
    """Every attribute deploy/runners/trt_runner.py reads off a TensorRT object (`trt.X`, `self.engine.X`,
    `ctx.X`, `trt.X.Y`, ...), read from its source: a call added there is checked without editing this test."""
    import ast

    from deploy.runners import trt_runner

    def named(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in TENSORRT_OBJECTS
        return isinstance(node, ast.Attribute) and (node.attr in TENSORRT_OBJECTS or named(node.value))

    tree = ast.parse(Path(trt_runner.__file__).read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and named(n.value)}


def test_every_call_exists_in_tensorrt_11_4():
    """TensorRT 11.x removed APIs (weak typing, V2 methods): each name g2trt calls on the full TensorRT is
    still in 11.4's compiled bindings (its pybind11 string table; the module cannot load without the
    libraries), so none of them is one 11.x removed."""
    from tests.trt_plugins.real_tensorrt_plugin import plugin_dir

    path = plugin_dir()
    assert path is not None, "pip install tensorrt-cu13-bindings==11.4.0.106 (a dev dependency)"
    binary = (path.parent / "tensorrt.so").read_bytes()  # the linker stores "Builder" as the tail of "IBuilder"
    runner = runner_calls()
    assert {"execute_async_v3", "set_input_shape", "get_tensor_location", "DEVICE"} <= runner  # the scan works
    names = set(FULL_TENSORRT_CALLS) | runner | {m for p in CLASSES for m in members(p)} | set(CLASSES.values())
    names -= RTX_ONLY
    missing = sorted(n for n in names if n.encode() + b"\0" not in binary)
    assert not missing, f"not in TensorRT 11.4's bindings: {missing}"
    assert b"platform_has_fast_fp16\0" not in binary  # removed in 11.x: the check can tell

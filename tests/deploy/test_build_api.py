"""The TensorRT API surface deploy.engine.build is type-checked against (deploy/engine/trt_api.py) exists in the
installed TensorRT-RTX: a renamed or removed member fails here, not in a user's build."""

from __future__ import annotations

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


# What g2trt calls on the full TensorRT beyond the build Protocols: module members, enum values, the runner's
# engine/context calls (deploy/runners/trt_runner.py) and the plugin registration's needs.
FULL_TENSORRT_CALLS = (
    # deploy/engine/build.py, backend.py
    "Builder", "OnnxParser", "ILogger", "IStreamWriter", "Runtime", "NetworkDefinitionCreationFlag",
    "STRONGLY_TYPED", "ProfilingVerbosity", "DETAILED", "LayerInformationFormat", "create_engine_inspector",
    "get_engine_information", "deserialize_cuda_engine", "INTERNAL_ERROR",
    # deploy/runners/trt_runner.py
    "create_execution_context", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "TensorIOMode",
    "get_tensor_dtype", "get_tensor_location", "TensorLocation", "DEVICE", "num_optimization_profiles",
    "get_tensor_profile_shape", "set_optimization_profile_async", "set_input_shape", "set_tensor_address",
    "get_tensor_shape", "execute_async_v3", "DataType", "FLOAT", "HALF", "BF16", "INT64", "INT32",
    # trt_plugins/registration/tensorrt_qdp.py (tensorrt.plugin's AOT path needs QuickPluginCreationRequest)
    "QuickPluginCreationRequest", "IPluginV3QuickAOTBuild", "float32", "float16", "bfloat16", "int64",
)  # fmt: skip


RTX_ONLY = {"num_compute_capabilities", "set_compute_capability"}  # ahead-of-time targets (TrtBackend.apply_targets)


def test_every_call_exists_in_tensorrt_11_4():
    """TensorRT 11.x removed APIs (weak typing, V2 methods): each name g2trt calls on the full TensorRT is
    still in 11.4's compiled bindings (its pybind11 string table; the module cannot load without the
    libraries), so none of them is one 11.x removed."""
    from tests.trt_plugins.real_tensorrt_plugin import plugin_dir

    path = plugin_dir()
    assert path is not None, "pip install tensorrt-cu13-bindings==11.4.0.106 (a dev dependency)"
    binary = (path.parent / "tensorrt.so").read_bytes()  # the linker stores "Builder" as the tail of "IBuilder"
    names = set(FULL_TENSORRT_CALLS) | {m for p in CLASSES for m in members(p)} | set(CLASSES.values())
    names -= RTX_ONLY
    missing = sorted(n for n in names if n.encode() + b"\0" not in binary)
    assert not missing, f"not in TensorRT 11.4's bindings: {missing}"
    assert b"platform_has_fast_fp16\0" not in binary  # removed in 11.x: the check can tell

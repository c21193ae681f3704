"""g2trt plugin ops: specs, PyTorch references, Triton kernels and TensorRT registration.

`PLUGINS` maps each plugin name to its module (holding SPEC, output_shapes and reference). It is made on
first use: the plugin modules import torch for their references, and what reads only `trt_plugins.spec`
(onnxruntime's runner checking a graph for plugin nodes) must not pay for that.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    PLUGINS: dict[str, ModuleType]


def __getattr__(name: str) -> Any:
    if name != "PLUGINS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trt_plugins import attention, attention_inplace, sandwich_rmsnorm, softcap

    plugins = {m.SPEC.name: m for m in (sandwich_rmsnorm, softcap, attention, attention_inplace)}
    globals()["PLUGINS"] = plugins
    return plugins

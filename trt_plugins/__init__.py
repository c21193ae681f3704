"""g2trt plugin ops: specs, PyTorch references, Triton kernels and TensorRT registration.

`PLUGINS` maps each plugin name to its module (holding SPEC, output_shapes and reference).
"""

from __future__ import annotations

from types import ModuleType

from trt_plugins import attention, attention_inplace, sandwich_rmsnorm, softcap

PLUGINS: dict[str, ModuleType] = {m.SPEC.name: m for m in (sandwich_rmsnorm, softcap, attention, attention_inplace)}

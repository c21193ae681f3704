"""Triton kernels of the g2trt plugins, one module per plugin, each with `plan(...)` (one specialization, shared
by launch and ahead-of-time compile) and `launch(...)` (same signature as the plugin's PyTorch reference).

`KERNELS` maps a plugin name to its kernel module. Importing this package imports Triton.
"""

from __future__ import annotations

from types import ModuleType

from trt_plugins.kernels import attention, attention_inplace, sandwich_rmsnorm, softcap

KERNELS: dict[str, ModuleType] = {m.SPEC.name: m for m in (sandwich_rmsnorm, softcap, attention, attention_inplace)}

"""What every plugin kernel module shares: the `KernelPlan` that describes one specialized launch, dtype names,
and the fp32 `tanh` the interpreter can run.

A `KernelPlan` is the single description of a kernel launch used both by `launch(...)` on torch tensors (CPU
under `TRITON_INTERPRET=1`, or CUDA) and by the ahead-of-time compile in `trt_plugins/aot.py`, so the grid and
the scalar arguments a TensorRT plugin computes are the ones the parity tests exercised.

Calling convention (TensorRT's AOT quick-deployable plugins launch kernels this way): the kernel's runtime
parameters are the plugin's input pointers in spec order, then int32 scalars, then its output pointers in spec
order. Every other parameter is a `tl.constexpr` (plugin attributes, static dims, block sizes): TensorRT can only
pass integer extra arguments, and the attributes are fixed per plugin node anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from export.errors import G2trtError
from trt_plugins.spec import PluginSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = ("fp32", "fp16", "bf16")

# (a, b) -> ceil(a / b); `a` may be an int or a TensorRT ShapeExpr, `b` is a positive int constant.
Cdiv = Callable[[Any, int], Any]


def int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dtype_name(t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise G2trtError(f"unsupported tensor dtype {t.dtype} (supported: {sorted(TORCH_DTYPES)})") from None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def product(dims: Sequence[Any]) -> Any:
    """Product of dims that may be ints or symbolic TensorRT shape expressions."""
    return functools.reduce(operator.mul, dims) if len(dims) else 1


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One specialization of a plugin kernel: everything needed to launch it or compile it ahead of time.

    `grid(shapes, cdiv)` and `scalars(shapes)` take the plugin's input shapes in spec order (ints, or TensorRT
    shape expressions) and return the launch grid and the int32 scalar arguments (in `scalar_args` order).
    """

    plugin: str
    fn: Any  # triton.JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    input_args: tuple[str, ...]  # pointer parameters, the plugin's inputs in spec order
    scalar_args: tuple[str, ...]  # int32 parameters
    output_args: tuple[str, ...]  # pointer parameters, the plugin's outputs in spec order
    pointer_types: Mapping[str, str]  # parameter -> Triton pointer type, e.g. "*fp16"
    constexprs: Mapping[str, int | float]
    num_warps: int
    num_stages: int
    grid: Callable[[Sequence[Sequence[Any]], Cdiv], tuple[Any, Any, Any]]
    scalars: Callable[[Sequence[Sequence[Any]]], tuple[Any, ...]]

    @property
    def runtime_args(self) -> tuple[str, ...]:
        return self.input_args + self.scalar_args + self.output_args

    def signature(self) -> dict[str, str]:
        """Triton signature of every kernel parameter, in the kernel's parameter order."""
        names = list(self.fn.arg_names)
        if tuple(n for n in names if n not in self.constexprs) != self.runtime_args:
            raise G2trtError(f"{self.plugin}: kernel parameters {names} do not follow the plan {self.runtime_args}")
        sig = {}
        for n in names:
            if n in self.constexprs:
                sig[n] = "constexpr"
            elif n in self.scalar_args:
                sig[n] = "i32"
            else:
                sig[n] = self.pointer_types[n]
        return sig

    def run(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        """Launch on torch tensors (contiguous; CUDA, or CPU under TRITON_INTERPRET=1)."""
        shapes = [tuple(t.shape) for t in inputs]
        grid = tuple(int(g) for g in self.grid(shapes, int_cdiv))
        if min(grid) == 0:
            return
        scalars = [int(s) for s in self.scalars(shapes)]
        for s, name in zip(scalars, self.scalar_args, strict=True):
            if not 0 <= s < 2**31:
                raise G2trtError(f"{self.plugin}: {name}={s} does not fit the kernel's int32 argument")
        self.fn[grid](
            *inputs, *scalars, *outputs, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )


def resolve_dtypes(
    spec: PluginSpec, default: str, overrides: Mapping[str, str] | None, fixed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Dtype name of each spec input, in spec order: `default` for float inputs, `fixed` ones (int64 masks),
    then `overrides` (e.g. an fp32 residual beside fp16 activations)."""
    fixed = fixed or {}
    if default not in FLOAT_DTYPES:
        raise G2trtError(f"plugin {spec.name}: unsupported dtype {default!r} (supported: {', '.join(FLOAT_DTYPES)})")
    out = {name: fixed.get(name, default) for name in spec.inputs}
    for name, dt in (overrides or {}).items():
        if name not in out:
            raise G2trtError(f"plugin {spec.name}: no input {name!r} (inputs: {', '.join(spec.inputs)})")
        allowed = (fixed[name],) if name in fixed else FLOAT_DTYPES
        if dt not in allowed:
            raise G2trtError(
                f"plugin {spec.name}: input {name!r}: dtype {dt!r} not supported (supported: {', '.join(allowed)})"
            )
        out[name] = dt
    return out


@triton.jit
def tanh_f32(x):
    """tanh in fp32 from exp2 (the interpreter has no libdevice): a Taylor series near 0 keeps the relative
    error ~1e-7 where `(1 - e) / (1 + e)` would cancel, and e = 2^(-2|x| log2 e) never overflows."""
    ax = tl.abs(x)
    e = tl.exp2(ax * -2.885390081777927)  # exp(-2|x|)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)

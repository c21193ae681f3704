"""Triton kernel of the SandwichRMSNorm plugin: post-norm, residual add and next pre-norm in one pass.

One program per row of `hidden` values: the row of x and residual is read once into registers, both norms
run in fp32, and residual_out (residual's dtype) and normed (x's dtype) are written once: 2 reads + 2 writes
per element, where separate norm / add / norm kernels would move each row through memory 3 times.
`normed` is computed from the fp32 sum, before it is rounded to residual's dtype, as the reference does.
Grid: (rows, 1, 1), rows = numel / hidden. Parameters: x_ptr, res_ptr, post_ptr, pre_ptr | (no scalars) |
res_out_ptr, normed_ptr; constexprs EPS, HIDDEN, BLOCK (next power of two >= HIDDEN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from export.errors import G2trtError
from trt_plugins import sandwich_rmsnorm as op
from trt_plugins.kernels.common import Cdiv, KernelPlan, dtype_name, next_pow2, product, resolve_dtypes
from trt_plugins.sandwich_rmsnorm import SPEC

MAX_HIDDEN = 16384  # one row lives in registers: 16384 fp32 values over 16 warps is 32 per thread per tensor


@triton.jit
def sandwich_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    post_ptr,
    pre_ptr,
    res_out_ptr,
    normed_ptr,
    EPS: tl.constexpr,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < HIDDEN
    offs = row * HIDDEN + cols
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    h = res + x * tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + EPS) * post
    tl.store(res_out_ptr + offs, h.to(res_out_ptr.dtype.element_ty), mask=inside)
    normed = h * tl.rsqrt(tl.sum(h * h, axis=0) / HIDDEN + EPS) * pre
    tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=inside)


def plan(dtype: str, *, epsilon: float, hidden: int, tensor_dtypes: Mapping[str, str] | None = None) -> KernelPlan:
    """The kernel for rows of static size `hidden`; `dtype` is every input's dtype unless `tensor_dtypes`
    overrides one (e.g. {"residual": "fp32"} in fp16 exports). Outputs follow the spec's dtype rule."""
    dts = resolve_dtypes(SPEC, dtype, tensor_dtypes)
    res_out, normed = op.output_dtypes(*dts.values())
    hidden = int(hidden)
    if not 0 < hidden <= MAX_HIDDEN:
        raise G2trtError(f"plugin {SPEC.name}: hidden size {hidden} not in 1..{MAX_HIDDEN}")
    block = next_pow2(hidden)

    def grid(shapes: Sequence[Sequence[Any]], cdiv: Cdiv) -> tuple[Any, Any, Any]:
        return product(shapes[1][:-1]), 1, 1

    return KernelPlan(
        plugin=SPEC.name,
        fn=sandwich_rmsnorm_kernel,
        input_args=("x_ptr", "res_ptr", "post_ptr", "pre_ptr"),
        scalar_args=(),
        output_args=("res_out_ptr", "normed_ptr"),
        pointer_types={
            "x_ptr": f"*{dts['x']}",
            "res_ptr": f"*{dts['residual']}",
            "post_ptr": f"*{dts['post_scale']}",
            "pre_ptr": f"*{dts['pre_scale']}",
            "res_out_ptr": f"*{res_out}",
            "normed_ptr": f"*{normed}",
        },
        constexprs={"EPS": float(epsilon), "HIDDEN": hidden, "BLOCK": block},
        num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16,
        num_stages=1,
        grid=grid,
        scalars=lambda shapes: (),
    )


def launch(
    x: Tensor, residual: Tensor, post_scale: Tensor, pre_scale: Tensor, *, epsilon: float
) -> tuple[Tensor, Tensor]:
    """Same contract as `trt_plugins.sandwich_rmsnorm.reference`."""
    hidden = residual.shape[-1]
    if x.shape != residual.shape or post_scale.shape != (hidden,) or pre_scale.shape != (hidden,):
        raise G2trtError(
            f"plugin {SPEC.name}: shapes x {tuple(x.shape)}, residual {tuple(residual.shape)}, "
            f"post_scale {tuple(post_scale.shape)}, pre_scale {tuple(pre_scale.shape)} do not match"
        )
    inputs = [t.contiguous() for t in (x, residual, post_scale, pre_scale)]
    names = dict(zip(SPEC.inputs, (dtype_name(t) for t in inputs), strict=True))
    kernel = plan(names["x"], epsilon=epsilon, hidden=hidden, tensor_dtypes=names)
    shapes = op.output_shapes(*(tuple(t.shape) for t in inputs))
    dtypes = op.output_dtypes(*(t.dtype for t in inputs))
    residual_out, normed = (torch.empty(s, dtype=d, device=x.device) for s, d in zip(shapes, dtypes, strict=True))
    kernel.run(inputs, [residual_out, normed])
    return residual_out, normed

"""Triton kernel of the SoftCap plugin: `y = cap * tanh(x / cap)` elementwise, fp32 math.

Grid: (rows, column blocks) over x viewed as [rows, n_cols], n_cols = x's last (static) dim. Rows go on grid x
(up to 2^31 - 1) so prefill logits [B * S, vocab] fit; offsets are int64, so more than 2^31 elements work.
Parameters: x_ptr | (no scalars) | y_ptr; constexprs CAP, N_COLS, BLOCK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from export.errors import G2trtError
from trt_plugins import softcap as op
from trt_plugins.kernels.common import (
    Cdiv,
    KernelPlan,
    dtype_name,
    int_cdiv,
    next_pow2,
    product,
    resolve_dtypes,
    tanh_f32,
)
from trt_plugins.softcap import SPEC

MAX_GRID_Y = 65535


@triton.jit
def softcap_kernel(x_ptr, y_ptr, CAP: tl.constexpr, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < N_COLS
    offs = row * N_COLS + cols
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    y = tanh_f32(x / CAP) * CAP
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


def plan(
    dtype: str, *, cap: float, n_cols: int, tensor_dtypes: Mapping[str, str] | None = None, block: int | None = None
) -> KernelPlan:
    """The kernel for x of `dtype` with a static last dim `n_cols`; y has x's dtype (the spec's rule)."""
    dts = resolve_dtypes(SPEC, dtype, tensor_dtypes)
    (y_dtype,) = op.output_dtypes(*dts.values())
    cap = float(cap)
    if not cap > 0:
        raise G2trtError(f"plugin {SPEC.name}: cap must be > 0, got {cap}")
    n_cols = int(n_cols)
    block = block or min(next_pow2(n_cols), 2048)
    if int_cdiv(n_cols, block) > MAX_GRID_Y:
        raise G2trtError(f"plugin {SPEC.name}: last dim {n_cols} is too large for one grid row of {block}-blocks")

    def grid(shapes: Sequence[Sequence[Any]], cdiv: Cdiv) -> tuple[Any, Any, Any]:
        return product(shapes[0][:-1]), int_cdiv(n_cols, block), 1

    return KernelPlan(
        plugin=SPEC.name,
        fn=softcap_kernel,
        input_args=("x_ptr",),
        scalar_args=(),
        output_args=("y_ptr",),
        pointer_types={"x_ptr": f"*{dts['x']}", "y_ptr": f"*{y_dtype}"},
        constexprs={"CAP": cap, "N_COLS": n_cols, "BLOCK": block},
        num_warps=4 if block >= 512 else 1,
        num_stages=1,
        grid=grid,
        scalars=lambda shapes: (),
    )


def launch(x: Tensor, *, cap: float) -> Tensor:
    """Same contract as `trt_plugins.softcap.reference`."""
    if x.dim() == 0:
        raise G2trtError(f"plugin {SPEC.name}: x must have at least one dim")
    x = x.contiguous()
    (y_dtype,) = op.output_dtypes(x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    plan(dtype_name(x), cap=cap, n_cols=x.shape[-1]).run([x], [y])
    return y

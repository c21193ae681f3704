"""SandwichRMSNorm: Gemma 2's post-norm, residual add and the next pre-norm in one op.

    residual_out = residual + rmsnorm(x) * post_scale          # post_attn / post_ffw norm, then add
    normed       = rmsnorm(residual_out) * pre_scale           # pre_ffw / next input / final norm

`post_scale` and `pre_scale` are the folded `(1 + weight)` vectors [D]. Norm math in fp32; the add in
the residual's dtype.
Shape and dtype rule: residual_out has residual's shape and dtype (fp32 in fp16 exports: Gemma's
residual overflows fp16); normed has residual's shape and x's dtype (it feeds the next matmul).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from trt_plugins.spec import Attr, PluginSpec

if TYPE_CHECKING:  # the reference's imports are made where it runs: graph passes read only SPEC
    from torch import Tensor

T = TypeVar("T")

SPEC = PluginSpec(
    name="SandwichRMSNorm",
    inputs=("x", "residual", "post_scale", "pre_scale"),
    outputs=("residual_out", "normed"),
    attrs=(Attr("epsilon", "float", "RMSNorm epsilon of both norms", 1e-6),),
    doc=__doc__ or "",
)


def output_shapes(x: tuple[int, ...], residual: tuple[int, ...], *_: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [residual, residual]


def output_dtypes(x: T, residual: T, *_: T) -> list[T]:
    """The dtype rule above, over any dtype representation (str, torch.dtype, TensorRT DataType)."""
    return [residual, x]


def reference(
    x: Tensor, residual: Tensor, post_scale: Tensor, pre_scale: Tensor, *, epsilon: float
) -> tuple[Tensor, Tensor]:
    from export.model import rms_normalize

    h = residual.float() + rms_normalize(x, epsilon) * post_scale.float()
    normed = rms_normalize(h, epsilon) * pre_scale.float()
    return h.to(residual.dtype), normed.to(x.dtype)

"""SoftCap: `y = cap * tanh(x / cap)` elementwise (Gemma 2's final logits, cap = 30).

Shape and dtype rule: y has x's shape and dtype; the math runs in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from trt_plugins.spec import Attr, PluginSpec

if TYPE_CHECKING:  # the reference's imports are made where it runs: graph passes read only SPEC
    from torch import Tensor

T = TypeVar("T")

SPEC = PluginSpec(
    name="SoftCap",
    inputs=("x",),
    outputs=("y",),
    attrs=(Attr("cap", "float", "the bound c of c * tanh(x / c)"),),
    doc=__doc__ or "",
)


def output_shapes(x: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [x]


def output_dtypes(x: T) -> list[T]:
    """The dtype rule above, over any dtype representation (str, torch.dtype, TensorRT DataType)."""
    return [x]


def reference(x: Tensor, *, cap: float) -> Tensor:
    from export.model import softcap

    return softcap(x.float(), cap).to(x.dtype)

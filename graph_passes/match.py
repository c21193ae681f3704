"""Pattern matching by walking producers and consumers from an anchor node.

A matcher calls these helpers and lets `Reject` propagate: its message is *why* the candidate is not a
site ("Sqrt input comes from ReduceMean, expected Add(eps)"), which the pass report keeps and the
debug flag prints. Walking code reads like the pattern drawn in each pass's docstring, and handles the
variants exporters produce (operand order, optional Casts) without one rigid pattern per variant.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs


class Reject(Exception):
    """A candidate is not a site; the message says why."""


def producer(tensor: gs.Tensor, *ops: str) -> gs.Node:
    """The node producing `tensor`, which must be one of `ops`."""
    if not tensor.inputs:
        kind = "a constant" if isinstance(tensor, gs.Constant) else "a graph input"
        raise Reject(f"{tensor.name} is {kind}, expected the output of {'|'.join(ops)}")
    node = tensor.inputs[0]
    if node.op not in ops:
        raise Reject(f"{tensor.name} comes from {node.op}, expected {'|'.join(ops)}")
    return node


def maybe_producer(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    if tensor.inputs and tensor.inputs[0].op in ops:
        return tensor.inputs[0]
    return None


def only_consumer(tensor: gs.Tensor, *ops: str) -> gs.Node:
    """The single consumer of `tensor`, which must be one of `ops` (tensor must not be a graph output)."""
    users = list(tensor.outputs)
    if len(users) != 1:
        raise Reject(f"{tensor.name} has {len(users)} consumers, expected one {'|'.join(ops)}")
    if users[0].op not in ops:
        raise Reject(f"{tensor.name} feeds {users[0].op}, expected {'|'.join(ops)}")
    return users[0]


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The other operand of a binary node, given one of them."""
    if len(node.inputs) != 2:
        raise Reject(f"{node.op} {node.name} has {len(node.inputs)} inputs, expected 2")
    a, b = node.inputs
    if a is tensor:
        return b
    if b is tensor:
        return a
    raise Reject(f"{tensor.name} is not an input of {node.name}")


def const_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None  # weights stay on disk; matchers only read small inline constants
        return _values(tensor)
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return _values(value)
    return None


def _values(constant: gs.Constant) -> np.ndarray:
    """Its values, read without onnx-graphsurgeon's warning for bf16 (numpy has no bf16, so gs hands out
    fp32 copies and warns that a re-export would change the type; it does not: the graph keeps the
    original bf16 tensor, which tests/graph_passes/test_optimize.py's bf16 cases check)."""
    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        return np.asarray(constant.values)
    finally:
        gs.logger.G_LOGGER.severity = severity


def scalar(tensor: gs.Tensor, what: str) -> float:
    """A one-element constant as a float; Reject names `what` it was meant to be."""
    arr = const_array(tensor)
    if arr is None or arr.size != 1:
        raise Reject(f"{what} ({tensor.name}) is not a scalar constant")
    return float(arr.reshape(()))


def ints(tensor: gs.Tensor, what: str) -> list[int]:
    arr = const_array(tensor)
    if arr is None:
        raise Reject(f"{what} ({tensor.name}) is not constant")
    return [int(v) for v in arr.reshape(-1)]


def skip_cast(tensor: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None]:
    """(source, cast) if `tensor` is a Cast output, else (tensor, None)."""
    cast = maybe_producer(tensor, "Cast")
    return (cast.inputs[0], cast) if cast is not None else (tensor, None)


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    """numpy dtype of a tensor (bf16 as ml_dtypes.bfloat16; gs keeps it as the ONNX enum), None if unknown."""
    if tensor.dtype is None:
        return None
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(tensor.dtype)))


def cast_to(node: gs.Node) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


def last_axis(node: gs.Node, rank: int | None) -> bool:
    """Whether a reduction/softmax over `node` runs over the last axis only (attribute or input axes)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = ints(node.inputs[1], f"{node.op} axes")
    if axes is None:
        axes = [node.attrs.get("axis", -1)] if node.op == "Softmax" else None
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def check_private(interior: Iterable[gs.Node], allowed_external: Iterable[gs.Tensor] = ()) -> None:
    """Every output of the site's interior nodes is used only inside the site (else fusing would duplicate work)."""
    nodes = list(interior)
    ids = {id(n) for n in nodes}
    allowed = {id(t) for t in allowed_external}
    for node in nodes:
        for out in node.outputs:
            if id(out) in allowed:
                continue
            outside = [u for u in out.outputs if id(u) not in ids]
            if outside:
                raise Reject(f"intermediate {out.name} is also used by {outside[0].op} {outside[0].name}")

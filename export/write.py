"""Write a model with its weights in one external data file, hashing the data as it is written.

Why not `onnx_ir.save`: it materializes each lazy weight and writes it in one thread, through the page
cache, and the manifest then reads the whole data file back to hash it. At Gemma 2 2B in fp32 that is
10 GB drawn or read and converted on one core, written at the page cache's 0.4-0.6 GB/s, then re-read and
hashed on one core again. Here two worker threads materialize the next weights (random draws, checkpoint
reads, transposes and casts release the GIL) while the calling thread hashes the current one and hands it
to export.datafile's direct writer: both cores stay busy and nothing is read back. The file is laid out
as `onnx_ir.save` lays it out (initializers over 256 bytes, in order, packed densely): the same bytes.
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir

from export.datafile import HashedWriter

INLINE_BYTES = 256  # initializers of at most this size stay in model.onnx (onnx_ir.save's default)


def save_with_data(
    model: ir.Model, path: Path, data_file: str, on_tensor: Callable[[str, int], None] | None = None
) -> str:
    """Write `model` to `path` and its initializers over `INLINE_BYTES` to `path.parent / data_file`.

    Returns the data file's sha256. `on_tensor(name, nbytes)` is called as each tensor is written. The model
    is left as it was (its initializers keep their lazy tensors).
    """
    initializers = model.graph.initializers.values()
    values = [v for v in initializers if v.const_value is not None and v.const_value.nbytes > INLINE_BYTES]
    originals = [v.const_value for v in values]
    sizes = []
    try:
        with HashedWriter(path.parent / data_file) as out:
            for value, data in zip(values, _materialized(originals), strict=True):
                if on_tensor is not None:
                    on_tensor(value.name or "", data.nbytes)
                out.write(data)
                sizes.append(data.nbytes)
            digest = out.close()
        offset = 0
        for value, tensor, size in zip(values, originals, sizes, strict=True):
            assert tensor is not None
            shape = ir.Shape(tensor.shape.numpy())
            name = value.name or ""
            value.const_value = ir.ExternalTensor(
                data_file, offset, size, tensor.dtype, shape=shape, name=name, base_dir=path.parent
            )
            offset += size
        ir.save(model, path)
    finally:
        for value, tensor in zip(values, originals, strict=True):
            value.const_value = tensor
    return digest


def _materialized(tensors: list[ir.TensorProtocol | None], workers: int = 2, ahead: int = 2) -> Iterator[np.ndarray]:
    """Each tensor's bytes, in order; `workers` threads produce up to `ahead` next ones meanwhile.

    Tensors are independent (a random tensor has its own generator, a checkpoint tensor its own read), so
    two can be drawn at once on two cores and the values are the same as one at a time.
    """
    pool = ThreadPoolExecutor(workers, thread_name_prefix="g2trt-weights")
    pending: deque[Future[np.ndarray]] = deque()
    todo = iter(tensors)
    try:
        for t in itertools.islice(todo, ahead):
            pending.append(pool.submit(_bytes, t))
        while pending:
            data = pending.popleft().result()
            if (t := next(todo, None)) is not None:
                pending.append(pool.submit(_bytes, t))
            yield data
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bytes(tensor: ir.TensorProtocol | None) -> np.ndarray:
    """The tensor's serialized bytes as a flat uint8 array, a view of its data where that is its layout."""
    assert tensor is not None
    while isinstance(tensor, ir.LazyTensor):
        tensor = tensor.raw()
    raw = getattr(tensor, "raw", None)
    if (
        isinstance(tensor, ir.Tensor)
        and isinstance(raw, np.ndarray)
        and raw.dtype.itemsize * 8 == tensor.dtype.bitwidth
        and (raw.dtype.byteorder == "<" or (raw.dtype.byteorder in "=|" and sys.byteorder == "little"))
    ):
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return np.frombuffer(tensor.tobytes(), dtype=np.uint8)

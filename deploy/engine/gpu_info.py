"""The local GPU's compute capability, read from the CUDA driver (libcuda) without torch or TensorRT.

`g2trt build --backend tensorrt` builds for this GPU, and the engine check compares it with the SM an
engine was built for. `None` means no driver or no device: the machine can still build ahead of time
with TensorRT-RTX.
"""

from __future__ import annotations

import ctypes
import functools
import os

_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76


@functools.cache
def local_sm(device: int = 0) -> int | None:
    """Compute capability of CUDA device `device` as an SM number (8.9 -> 89), or None without one."""
    if os.environ.get("G2TRT_NO_GPU"):  # lets tests take the no-GPU path on a GPU machine
        return None
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        return None
    handle = ctypes.c_int(0)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, handle) != 0:
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, handle) != 0:
        return None
    return major.value * 10 + minor.value


SM_NAMES = {
    75: "Turing: T4, RTX 20xx",
    80: "Ampere: A100, A30",
    86: "Ampere: A10, A40, RTX 30xx",
    87: "Jetson Orin",
    89: "Ada: L4, L40S, RTX 40xx",
    90: "Hopper: H100, H200",
    100: "Blackwell: B200",
    120: "Blackwell: RTX 50xx, RTX PRO 6000",
    121: "Blackwell: DGX Spark",
}


def describe_sm(sm: int) -> str:
    """`SM 89 (Ada: L4, L40S, RTX 40xx)` — error messages name GPUs, not just numbers."""
    name = SM_NAMES.get(sm)
    return f"SM {sm} ({name})" if name else f"SM {sm}"

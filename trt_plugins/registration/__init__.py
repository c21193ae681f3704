"""Registering g2trt's plugins with TensorRT builders.

`tensorrt_qdp`: the full TensorRT (>= 10.15), through `tensorrt.plugin` with ahead-of-time Triton kernels
embedded in the engine. `rtx_probe`: the recorded experiment of the same plugins under TensorRT-RTX 1.7,
whose process aborts on Python plugins (see docs/build.md).
"""

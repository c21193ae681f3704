"""The deploy layer: it uses export/, graph_passes/ and trt_plugins/; nothing below imports it.

cli.py, pipeline.py, console.py   the `g2trt` command line, the main job, terminal output
engine/                           TensorRT / TensorRT-RTX engine builds
runners/                          one forward-step interface per backend
generate/                         the generation loop, KV cache, sampling, tokenizers
verify/                           parity of any graph against PyTorch
bench/                            benchmarks against onnxruntime and onnxruntime-genai
serve/                            Triton Inference Server repositories
"""

"""Gemma 2 in PyTorch, HF checkpoint loading and ONNX export."""

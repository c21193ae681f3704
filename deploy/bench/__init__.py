"""Benchmarks of every backend against onnxruntime and onnxruntime-genai, each backend in its own process."""

"""Runners: one forward-step interface over PyTorch, onnxruntime, onnx's reference evaluator and TensorRT."""

"""Numerical parity of any g2trt graph or runner against the PyTorch model."""

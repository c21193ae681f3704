"""Engines, runners, generation, benchmarks and the `g2trt` command line."""

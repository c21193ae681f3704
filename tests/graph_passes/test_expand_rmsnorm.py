"""expand_rmsnorm: RMSNorm -> the standard ops dynamo writes (for TensorRT), same numbers."""

from __future__ import annotations

import numpy as np

from graph_passes import expand_rmsnorm, fuse_rmsnorm
from tests.graph_passes.graphs import (
    NORM_SCALE,
    apply,
    fused_rmsnorm_model,
    max_output_diff,
    ops,
    prefill_feeds,
    run,
)


def test_rmsnorm_expands_to_the_dynamo_pattern_and_back() -> None:
    expanded, (report,) = apply(fused_rmsnorm_model(), expand_rmsnorm.PASS)
    assert report.count == 1 and sorted(ops(expanded)) == sorted(
        ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32) * 5
    ms = (x.astype(np.float64) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(run(expanded, {"x": x})[0], x / np.sqrt(ms + 1e-6) * NORM_SCALE, rtol=1e-5, atol=1e-5)
    refused, (again,) = apply(expanded, fuse_rmsnorm.PASS)  # what it writes is what fuse_rmsnorm reads
    assert again.count == 1 and ops(refused) == ["RMSNorm"]


def test_other_domains_are_left_alone() -> None:
    out, (report,) = apply(fused_rmsnorm_model("custom"), expand_rmsnorm.PASS)
    assert report.count == 0 and ops(out) == ["RMSNorm"]


def test_tiny_export_round_trip(tiny_proto, tiny_export, tiny_cfg) -> None:
    expanded, (_, report) = apply(tiny_proto, fuse_rmsnorm.PASS, expand_rmsnorm.PASS, config=tiny_cfg)
    assert report.count == 17 and sorted(ops(expanded)) == sorted(ops(tiny_proto))
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, expanded, weights, prefill_feeds(tiny_cfg)) == 0.0

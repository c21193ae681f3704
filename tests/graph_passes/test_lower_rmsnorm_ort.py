"""lower_rmsnorm_ort: RMSNorm -> onnxruntime's SimplifiedLayerNormalization, same numbers."""

from __future__ import annotations

import numpy as np

from export.model import rms_normalize
from graph_passes import fuse_rmsnorm, lower_rmsnorm_ort
from tests.graph_passes.graphs import (
    FP32_BOUND,
    NORM_SCALE,
    apply,
    fused_rmsnorm_model,
    max_output_diff,
    ops,
    prefill_feeds,
    run,
)


def test_rmsnorm_becomes_simplified_layer_normalization() -> None:
    lowered, (report,) = apply(fused_rmsnorm_model(), lower_rmsnorm_ort.PASS)
    assert report.count == 1 and ops(lowered) == ["SimplifiedLayerNormalization"]
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32) * 5
    import torch

    want = (rms_normalize(torch.from_numpy(x), 1e-6) * torch.from_numpy(NORM_SCALE)).numpy()
    np.testing.assert_allclose(run(lowered, {"x": x})[0], want, rtol=1e-6, atol=1e-6)


def test_other_domains_are_left_alone() -> None:
    m = fused_rmsnorm_model("custom")
    out, (report,) = apply(m, lower_rmsnorm_ort.PASS)
    assert report.count == 0 and ops(out) == ["RMSNorm"] and "not the internal RMSNorm" in report.rejected[0].reason


def test_tiny_export(tiny_proto, tiny_export, tiny_cfg) -> None:
    lowered, (_, report) = apply(tiny_proto, fuse_rmsnorm.PASS, lower_rmsnorm_ort.PASS, config=tiny_cfg)
    assert report.count == 17 and ops(lowered).count("SimplifiedLayerNormalization") == 17
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, lowered, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

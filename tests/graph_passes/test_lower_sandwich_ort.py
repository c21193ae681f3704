"""lower_sandwich_ort: SandwichRMSNorm -> SimplifiedLayerNormalization + SkipSimplifiedLayerNormalization,
equal to the plugin's reference in fp32 and with fp16 activations over an fp32 residual."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes import expand_rmsnorm, fuse_rmsnorm, fuse_sandwich_norm, lower_sandwich_ort
from tests.graph_passes.graphs import (
    F16,
    F32,
    FP32_BOUND,
    apply,
    const,
    max_output_diff,
    node_model,
    ops,
    prefill_feeds,
    run,
)
from trt_plugins.sandwich_rmsnorm import SPEC

BF16 = 16


def sandwich(x_type: int, residual_type: int = F32, domain: str = SPEC.domain):
    return node_model(
        SPEC.name,
        domain,
        [("x", x_type, [2, 3, 16]), ("residual", residual_type, [2, 3, 16])],
        [("residual_out", residual_type, [2, 3, 16]), ("normed", x_type, [2, 3, 16])],
        [const("post_scale", np.linspace(0.5, 1.5, 16)), const("pre_scale", np.linspace(2, 1, 16))],
        **SPEC.attributes(epsilon=1e-6),
    )


@pytest.mark.parametrize("x_type", [F32, F16])
def test_sandwich_equals_its_reference(x_type: int) -> None:
    m = sandwich(x_type)
    lowered, (report,) = apply(m, lower_sandwich_ort.PASS)
    assert report.count == 1 and {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= set(
        ops(lowered)
    )
    rng = np.random.default_rng(0)
    feeds = {
        "x": (rng.standard_normal((2, 3, 16)) * 4).astype(np.float16 if x_type == F16 else np.float32),
        "residual": (rng.standard_normal((2, 3, 16)) * 30).astype(np.float32),
    }
    for got, want in zip(run(lowered, feeds), run(m, feeds), strict=True):
        assert got.dtype == want.dtype
        tol = 1e-3 if x_type == F16 else 1e-5
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


def test_bf16_residual_is_rejected_with_the_reason() -> None:
    out, (report,) = apply(sandwich(BF16, BF16), lower_sandwich_ort.PASS)
    assert report.count == 0 and ops(out) == [SPEC.name] and "needs fp32" in report.rejected[0].reason


def test_tiny_export(tiny_proto, tiny_export, tiny_cfg) -> None:
    passes = (fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS, lower_sandwich_ort.PASS, expand_rmsnorm.PASS)
    lowered, reports = apply(tiny_proto, *passes, config=tiny_cfg)
    assert reports[2].count == 8 and ops(lowered).count("SkipSimplifiedLayerNormalization") == 8
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, lowered, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

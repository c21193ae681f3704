"""expand_sandwich_norm: SandwichRMSNorm -> standard ops, as the model computes them (Casts included)."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes import expand_rmsnorm, expand_sandwich_norm, fuse_rmsnorm, fuse_sandwich_norm
from tests.graph_passes.graphs import F16, F32, FP32_BOUND, apply, max_output_diff, ops, prefill_feeds, run
from tests.graph_passes.test_lower_sandwich_ort import sandwich
from trt_plugins.sandwich_rmsnorm import SPEC


@pytest.mark.parametrize("x_type", [F32, F16])
def test_expanded_sandwich_equals_its_reference(x_type: int) -> None:
    m = sandwich(x_type)
    expanded, (report,) = apply(m, expand_sandwich_norm.PASS)
    assert report.count == 1 and SPEC.name not in ops(expanded) and ops(expanded).count("ReduceMean") == 2
    rng = np.random.default_rng(1)
    feeds = {
        "x": (rng.standard_normal((2, 3, 16)) * 4).astype(np.float16 if x_type == F16 else np.float32),
        "residual": (rng.standard_normal((2, 3, 16)) * 30).astype(np.float32),
    }
    for got, want in zip(run(expanded, feeds), run(m, feeds), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_other_domains_are_left_alone() -> None:
    out, (report,) = apply(sandwich(F32, domain="custom"), expand_sandwich_norm.PASS)
    assert report.count == 0 and ops(out) == [SPEC.name]


def test_tiny_export_round_trip(tiny_proto, tiny_export, tiny_cfg) -> None:
    passes = (fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS, expand_sandwich_norm.PASS, expand_rmsnorm.PASS)
    expanded, reports = apply(tiny_proto, *passes, config=tiny_cfg)
    assert reports[2].count == 8 and sorted(ops(expanded)) == sorted(ops(tiny_proto))
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, expanded, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

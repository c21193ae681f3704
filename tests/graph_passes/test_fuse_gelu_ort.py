"""fuse_gelu_ort: the exported tanh-GELU -> com.microsoft.FastGelu, same numbers; a soft-cap's Tanh is not it."""

from __future__ import annotations

import numpy as np

from graph_passes import fuse_gelu_ort
from graph_passes.labels import expected_layers
from tests.graph_passes.graphs import FP32_BOUND, apply, max_output_diff, ops, prefill_feeds, run
from tests.graph_passes.test_insert_softcap import _cap_model, _gelu_model


def test_gelu_becomes_fastgelu() -> None:
    m = _gelu_model()
    fused, (report,) = apply(m, fuse_gelu_ort.PASS)
    assert report.count == 1 and ops(fused) == ["FastGelu"]
    x = (np.random.default_rng(0).standard_normal((2, 5)) * 4).astype(np.float32)
    np.testing.assert_allclose(run(fused, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_softcap_is_not_a_gelu() -> None:
    m = _cap_model(30.0, 30.0)
    out, (report,) = apply(m, fuse_gelu_ort.PASS)
    assert report.count == 0 and ops(out) == ops(m) and "expected Mul" in report.rejected[0].reason


def test_idempotent() -> None:
    once, _ = apply(_gelu_model(), fuse_gelu_ort.PASS)
    twice, (again,) = apply(once, fuse_gelu_ort.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_one_per_layer(tiny_proto, tiny_export, tiny_cfg) -> None:
    fused, (report,) = apply(tiny_proto, fuse_gelu_ort.PASS, config=tiny_cfg)
    assert report.sites == expected_layers(tiny_cfg) and ops(fused).count("FastGelu") == 4
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, fused, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

"""fuse_rmsnorm: every exporter form of RMSNorm fuses to one node with unchanged numbers; near misses
(no eps, Llama's cast before the weight) are left alone with the reason recorded."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes import expand_rmsnorm, fuse_rmsnorm, lower_rmsnorm_ort
from graph_passes.labels import expected_norms
from graph_passes.report import PassReport
from tests.graph_passes.graphs import (
    F16,
    FP32_BOUND,
    apply,
    const,
    max_output_diff,
    model,
    ops,
    prefill_feeds,
    rmsnorm_nodes,
    run,
    vi,
)


def _norm_model(form: str):
    nodes, inits = rmsnorm_nodes("x", "scale", "y", "n/", form)
    opset = 17 if form == "torchscript" else 18
    out_type = F16 if form == "llama-fp16" else 1
    return model(
        nodes,
        [vi("x", shape=[2, 3, 8])],
        [vi("y", out_type, [2, 3, 8])],
        [*inits, const("scale", np.linspace(0.5, 1.5, 8))]
        if form != "llama-fp16"
        else [*inits, const("scale", np.linspace(0.5, 1.5, 8), np.float16)],
        opset,
    )


@pytest.mark.parametrize("form", ["dynamo", "torchscript"])
@pytest.mark.parametrize("lowering", [expand_rmsnorm.PASS, lower_rmsnorm_ort.PASS])
def test_exporter_forms_fuse_to_one_node_and_keep_numbers(form: str, lowering) -> None:
    m = _norm_model(form)
    fused, (report, lowered) = apply(m, fuse_rmsnorm.PASS, lowering)
    assert report.count == 1 and report.nodes_before == len(m.graph.node) and report.nodes_after == 1
    assert lowered.count == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 3
    np.testing.assert_allclose(run(fused, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_opset23_rmsnormalization_is_one_rmsnorm() -> None:
    m = model(
        [__import__("onnx").helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-6)],
        [vi("x", shape=[2, 3, 8])],
        [vi("y", shape=[2, 3, 8])],
        [const("scale", np.linspace(0.5, 1.5, 8))],
        23,
    )
    fused, (report, _) = apply(m, fuse_rmsnorm.PASS, lower_rmsnorm_ort.PASS)
    assert report.count == 1 and ops(fused) == ["SimplifiedLayerNormalization"]
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run(fused, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("form", "reason"), [("no-eps", "expected Add"), ("llama-fp16", "feeds Cast")])
def test_near_misses_are_left_unchanged_with_a_reason(form: str, reason: str) -> None:
    m = _norm_model(form)
    out, (report,) = apply(m, fuse_rmsnorm.PASS)
    assert report.count == 0 and ops(out) == ops(m)
    assert len(report.rejected) == 1 and reason in report.rejected[0].reason


def test_idempotent() -> None:
    once, _ = apply(_norm_model("dynamo"), fuse_rmsnorm.PASS)
    twice, (again,) = apply(once, fuse_rmsnorm.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_every_norm_by_layer_and_unchanged_outputs(tiny_proto, tiny_export, tiny_cfg) -> None:
    fused, (report, _) = apply(tiny_proto, fuse_rmsnorm.PASS, expand_rmsnorm.PASS, config=tiny_cfg)
    assert isinstance(report, PassReport)
    assert report.sites == expected_norms(tiny_cfg) and report.missing == []  # 4 per layer + the final norm
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, fused, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

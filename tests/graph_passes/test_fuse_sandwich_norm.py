"""fuse_sandwich_norm: post-norm + residual + next pre-norm -> one SandwichRMSNorm (run here as its
PyTorch reference); a pre-norm-only (Llama) block has no sandwich and is left alone."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper as h

from graph_passes import expand_rmsnorm, expand_sandwich_norm, fuse_rmsnorm, fuse_sandwich_norm
from graph_passes.labels import expected_sandwiches
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
from trt_plugins.sandwich_rmsnorm import SPEC


def _sandwich_model(half: bool = False) -> onnx.ModelProto:
    """x (fp16 if `half`, cast to fp32) -> post-norm -> + residual -> h -> pre-norm -> normed (cast back)."""
    post, post_i = rmsnorm_nodes("xf", "post_scale", "p", "post/")
    pre, pre_i = rmsnorm_nodes("hsum", "pre_scale", "nf", "pre/")
    nodes = [h.make_node("Cast", ["x"], ["xf"], to=1)] if half else [h.make_node("Identity", ["x"], ["xf"])]
    nodes += [*post, h.make_node("Add", ["residual", "p"], ["hsum"]), *pre]
    nodes += (
        [h.make_node("Cast", ["nf"], ["normed"], to=F16)] if half else [h.make_node("Identity", ["nf"], ["normed"])]
    )
    nodes += [h.make_node("Identity", ["hsum"], ["residual_out"])]
    x_type = F16 if half else 1
    inits = [*post_i, *pre_i, const("post_scale", np.linspace(0.5, 1.5, 8)), const("pre_scale", np.linspace(2, 1, 8))]
    return model(
        nodes,
        [vi("x", x_type, [2, 3, 8]), vi("residual", shape=[2, 3, 8])],
        [vi("normed", x_type, [2, 3, 8]), vi("residual_out", shape=[2, 3, 8])],
        inits,
    )


def _llama_block() -> onnx.ModelProto:
    """Pre-norm only: h = x + f(norm(x)); out = norm(h). No norm feeds a residual add."""
    n1, i1 = rmsnorm_nodes("x", "s1", "a", "n1/")
    n2, i2 = rmsnorm_nodes("hsum", "s2", "y", "n2/")
    nodes = [*n1, h.make_node("Tanh", ["a"], ["f"]), h.make_node("Add", ["x", "f"], ["hsum"]), *n2]
    inits = [*i1, *i2, const("s1", np.ones(8)), const("s2", np.ones(8))]
    return model(nodes, [vi("x", shape=[2, 3, 8])], [vi("y", shape=[2, 3, 8])], inits)


def _feeds(half: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((2, 3, 8)).astype(np.float16 if half else np.float32) * 4,
        "residual": rng.standard_normal((2, 3, 8)).astype(np.float32) * 20,
    }


def test_sandwich_fuses_to_one_plugin_node_with_unchanged_numbers() -> None:
    m = _sandwich_model()
    fused, (_, report) = apply(m, fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS)
    assert report.count == 1
    assert [n.op_type for n in fused.graph.node if n.domain == SPEC.domain] == [SPEC.name]
    node = next(n for n in fused.graph.node if n.op_type == SPEC.name)
    attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"g2trt"
    for a, b in zip(run(fused, _feeds(False)), run(m, _feeds(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_fp16_casts_are_absorbed_and_dtypes_follow_the_spec() -> None:
    m = _sandwich_model(half=True)
    fused, (_, report) = apply(m, fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS)
    assert report.count == 1 and "Cast" not in ops(fused)  # x fp16 in, normed fp16 out, residual fp32
    for a, b in zip(run(fused, _feeds(True)), run(m, _feeds(True)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)
    expanded, _ = apply(fused, expand_sandwich_norm.PASS)
    for a, b in zip(run(expanded, _feeds(True)), run(m, _feeds(True)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pre_norm_only_block_has_no_sandwich() -> None:
    m = _llama_block()
    fused, (norms, report) = apply(m, fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS)
    assert norms.count == 2 and report.count == 0
    assert all(op != SPEC.name for op in ops(fused))
    assert any("no post-norm" in r.reason for r in report.rejected)


def test_idempotent() -> None:
    once, _ = apply(_sandwich_model(), fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS)
    twice, (again,) = apply(once, fuse_sandwich_norm.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_two_per_layer_and_unchanged_outputs(tiny_proto, tiny_export, tiny_cfg) -> None:
    fused, (_, report, _) = apply(
        tiny_proto, fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS, expand_rmsnorm.PASS, config=tiny_cfg
    )
    assert report.sites == expected_sandwiches(tiny_cfg)  # layer i attn / ffw; the last ffw takes the final norm
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, fused, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND


def test_last_logits_only_export_fuses_through_the_slice(tiny_export, tiny_cfg) -> None:
    result = tiny_export("fp32", last_logits_only=True)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    fused, (_, report, _) = apply(
        proto, fuse_rmsnorm.PASS, fuse_sandwich_norm.PASS, expand_rmsnorm.PASS, config=tiny_cfg
    )
    assert report.sites == expected_sandwiches(tiny_cfg)
    assert max_output_diff(proto, fused, result.model_path.parent, prefill_feeds(tiny_cfg)) <= FP32_BOUND

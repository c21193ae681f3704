"""fuse_parallel_matmuls: MatMuls of one input with constant weights -> one MatMul on the concatenated
weights + Split, same numbers; a lone projection, a weight computed in the graph, or a different input
width is not a site; the tiny export has q/k/v and gate/up in every layer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graph_passes import fuse_parallel_matmuls
from tests.graph_passes.graphs import FP32_BOUND, apply, const, max_output_diff, model, ops, prefill_feeds, run, vi

RNG = np.random.default_rng(0)


def _model(widths: tuple[int, ...], k: int = 6, variable_weight: bool = False) -> onnx.ModelProto:
    weights = [const(f"W{i}", RNG.standard_normal((k, n)).astype(np.float32)) for i, n in enumerate(widths)]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]) for i in range(len(widths))]
    inputs = [vi("x", shape=["b", "s", k])]
    if variable_weight:  # one more MatMul of x whose weight is a graph input, not an initializer
        nodes.append(helper.make_node("MatMul", ["x", "w_in"], ["y_in"]))
        inputs.append(vi("w_in", shape=[k, 3]))
    outputs = [vi(n.output[0]) for n in nodes]
    return model(nodes, inputs, outputs, weights)


def _feeds(k: int = 6) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 3, k)).astype(np.float32)}


def test_three_projections_become_one_matmul_and_a_split() -> None:
    m = _model((4, 2, 2))
    out, (report,) = apply(m, fuse_parallel_matmuls.PASS)
    assert report.count == 1 and sorted(ops(out)) == ["Concat", "MatMul", "Split"]
    feeds = _feeds()
    for got, want in zip(run(out, feeds), run(m, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_lone_projection_is_left_alone() -> None:
    m = _model((4,))
    out, (report,) = apply(m, fuse_parallel_matmuls.PASS)
    assert report.count == 0 and ops(out) == ops(m)
    assert "only projection" in report.rejected[0].reason


def test_a_weight_computed_in_the_graph_stays_out_of_the_group() -> None:
    m = _model((4, 2), variable_weight=True)
    out, (report,) = apply(m, fuse_parallel_matmuls.PASS)
    assert report.count == 1 and ops(out).count("MatMul") == 2  # the two constant ones fused, w_in's kept
    assert any("not a constant 2-D initializer" in r.reason for r in report.rejected)
    feeds = _feeds() | {"w_in": RNG.standard_normal((6, 3)).astype(np.float32)}
    for got, want in zip(run(out, feeds), run(m, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_idempotent() -> None:
    once, _ = apply(_model((4, 2, 2)), fuse_parallel_matmuls.PASS)
    twice, (again,) = apply(once, fuse_parallel_matmuls.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_fuses_qkv_and_gate_up_in_every_layer(tiny_proto, tiny_export, tiny_cfg) -> None:
    out, (report,) = apply(tiny_proto, fuse_parallel_matmuls.PASS, config=tiny_cfg)
    assert report.sites == report.expected and report.count == 2 * tiny_cfg.num_hidden_layers
    assert "layer 0 q_proj+k_proj+v_proj" in report.sites and "layer 3 gate_proj+up_proj" in report.sites
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, out, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

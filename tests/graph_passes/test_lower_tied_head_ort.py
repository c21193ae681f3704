"""lower_tied_head_ort: the tied head MatMul(x, Transpose(E)) -> Gemm(transB=1) on E itself, same numbers;
a Transpose of a weight that is not also the embedding lookup (an untied head) is left alone."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graph_passes import lower_tied_head_ort
from tests.graph_passes.graphs import FP32_BOUND, apply, const, max_output_diff, model, ops, prefill_feeds, run, vi


def _head_model(tied: bool) -> onnx.ModelProto:
    e = np.random.default_rng(0).standard_normal((11, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "ET"], ["y"]),
    ]
    if tied:
        nodes.append(helper.make_node("Gather", ["E", "ids"], ["emb"]))
    inputs = [vi("x", shape=["b", "s", 6])] + ([vi("ids", onnx.TensorProto.INT64, ["b", "s"])] if tied else [])
    outputs = [vi("y")] + ([vi("emb")] if tied else [])
    return model(nodes, inputs, outputs, [const("E", e)])


def _feeds(tied: bool) -> dict[str, np.ndarray]:
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)}
    if tied:
        feeds["ids"] = np.array([[0, 4, 10], [1, 2, 3]], dtype=np.int64)
    return feeds


def test_tied_head_becomes_gemm_on_the_embedding() -> None:
    m = _head_model(tied=True)
    out, (report,) = apply(m, lower_tied_head_ort.PASS)
    assert report.count == 1 and "Gemm" in ops(out) and "Transpose" not in ops(out)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "E" and helper.get_attribute_value(gemm.attribute[0]) == 1
    got, want = run(out, _feeds(True)), run(m, _feeds(True))
    assert got[0].shape == (2, 3, 11)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_untied_transpose_is_left_alone() -> None:
    m = _head_model(tied=False)
    out, (report,) = apply(m, lower_tied_head_ort.PASS)
    assert report.count == 0 and ops(out) == ops(m)
    assert "not also the embedding lookup" in report.rejected[0].reason


def test_idempotent() -> None:
    once, _ = apply(_head_model(tied=True), lower_tied_head_ort.PASS)
    twice, (again,) = apply(once, lower_tied_head_ort.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_has_one_tied_head(tiny_proto, tiny_export, tiny_cfg) -> None:
    out, (report,) = apply(tiny_proto, lower_tied_head_ort.PASS, config=tiny_cfg)
    assert report.sites == ["lm_head"] and report.expected == ["lm_head"]
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, out, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

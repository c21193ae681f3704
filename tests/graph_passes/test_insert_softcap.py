"""insert_softcap: c * tanh(x / c) -> SoftCap(cap=c); the tanh-GELU and unequal constants are not soft-caps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as h

from graph_passes import insert_sliding_window_attention, insert_softcap
from tests.graph_passes.graphs import FP32_BOUND, apply, const, max_output_diff, model, ops, prefill_feeds, run, vi
from trt_plugins.softcap import SPEC


def _cap_model(c_in: float, c_out: float, mul_form: bool = False) -> onnx.ModelProto:
    pre = h.make_node("Mul", ["x", "c_in"], ["d"]) if mul_form else h.make_node("Div", ["x", "c_in"], ["d"])
    nodes = [pre, h.make_node("Tanh", ["d"], ["t"]), h.make_node("Mul", ["c_out", "t"], ["logits"])]
    inits = [const("c_in", 1 / c_in if mul_form else c_in), const("c_out", c_out)]
    return model(nodes, [vi("x", shape=[2, 5])], [vi("logits", shape=[2, 5])], inits)


def _gelu_model() -> onnx.ModelProto:
    """0.5 x (1 + tanh(0.79788 (x + 0.044715 x³))): a Tanh that is not a soft-cap."""
    nodes = [
        h.make_node("Pow", ["x", "three"], ["x3"]),
        h.make_node("Mul", ["x3", "k"], ["kx3"]),
        h.make_node("Add", ["x", "kx3"], ["inner"]),
        h.make_node("Mul", ["inner", "s"], ["arg"]),
        h.make_node("Tanh", ["arg"], ["t"]),
        h.make_node("Add", ["t", "one"], ["t1"]),
        h.make_node("Mul", ["x", "t1"], ["xt"]),
        h.make_node("Mul", ["xt", "half"], ["y"]),
    ]
    inits = [const("three", 3.0), const("k", 0.044715), const("s", 0.7978845608), const("one", 1.0), const("half", 0.5)]
    return model(nodes, [vi("x", shape=[2, 5])], [vi("y", shape=[2, 5])], inits)


@pytest.mark.parametrize("mul_form", [False, True])
def test_softcap_becomes_one_plugin_node(mul_form: bool) -> None:
    m = _cap_model(30.0, 30.0, mul_form)
    fused, (report,) = apply(m, insert_softcap.PASS)
    assert report.sites == ["logits"] and ops(fused) == [SPEC.name]
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32) * 100
    np.testing.assert_allclose(run(fused, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("m", "reason"), [(_cap_model(30.0, 20.0), "not a soft-cap"), (_gelu_model(), "feeds Add")])
def test_non_softcaps_are_left_alone(m: onnx.ModelProto, reason: str) -> None:
    out, (report,) = apply(m, insert_softcap.PASS)
    assert report.count == 0 and ops(out) == ops(m) and reason in report.rejected[0].reason


def test_idempotent() -> None:
    once, _ = apply(_cap_model(30.0, 30.0), insert_softcap.PASS)
    twice, (again,) = apply(once, insert_softcap.PASS)
    assert again.count == 0 and ops(twice) == ops(once)


def test_tiny_export_logits_after_attention_absorbed_its_caps(tiny_proto, tiny_export, tiny_cfg) -> None:
    weights = tiny_export("fp32").model_path.parent
    alone, (report,) = apply(tiny_proto, insert_softcap.PASS, config=tiny_cfg)
    assert report.count == 1 + tiny_cfg.num_hidden_layers  # alone it also wraps each attention soft-cap
    assert max_output_diff(tiny_proto, alone, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND
    in_order, (_, report) = apply(
        tiny_proto, insert_sliding_window_attention.PASS, insert_softcap.PASS, config=tiny_cfg
    )
    assert report.sites == ["logits"] and report.missing == []
    assert max_output_diff(tiny_proto, in_order, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

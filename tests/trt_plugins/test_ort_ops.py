"""trt_plugins.ort_ops: onnxruntime runs each plugin node as exactly its PyTorch reference, in the
graph's own dtypes (fp16 inputs are carried through fp32 and converted back, losslessly)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h

from trt_plugins import attention, ort_ops, sandwich_rmsnorm, softcap
from trt_plugins.spec import DOMAIN

NP = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16}


def _model(module, inputs: dict[str, tuple[int, list]], attrs: dict) -> onnx.ModelProto:
    spec = module.SPEC
    in_types = [t for t, _ in inputs.values()]
    out_types = module.output_dtypes(*in_types)
    node = h.make_node(spec.name, list(inputs), list(spec.outputs), domain=spec.domain, **spec.attributes(**attrs))
    graph = h.make_graph(
        [node],
        spec.name,
        [h.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [h.make_tensor_value_info(n, t, None) for n, t in zip(spec.outputs, out_types, strict=True)],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(DOMAIN, 1)])


def _check(module, feeds: dict[str, np.ndarray], attrs: dict) -> None:
    types = {
        n: (TP.INT64 if a.dtype == np.int64 else TP.FLOAT16 if a.dtype == np.float16 else TP.FLOAT, list(a.shape))
        for n, a in feeds.items()
    }
    proto = _model(module, types, attrs)
    so = __import__("onnxruntime").SessionOptions()
    ort_ops.register(so)
    sess = __import__("onnxruntime").InferenceSession(ort_ops.runnable(proto).SerializeToString(), so)
    got = sess.run(None, feeds)
    stored = module.SPEC.parse({a.name: h.get_attribute_value(a) for a in proto.graph.node[0].attribute})
    stored = {a.name: stored[a.name] for a in module.SPEC.attrs}  # as the node holds them (fp32 floats)
    want = module.reference(*(torch.from_numpy(a) for a in feeds.values()), **stored)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.numpy().dtype  # the graph's dtypes, per the spec's rule
        np.testing.assert_array_equal(g, w.numpy())  # bit for bit: it *is* the reference


@pytest.mark.parametrize("half", [False, True])
def test_softcap(half: bool) -> None:
    x = (np.random.default_rng(0).standard_normal((2, 7)) * 80).astype(np.float16 if half else np.float32)
    _check(softcap, {"x": x}, {"cap": 30.0})


@pytest.mark.parametrize("half", [False, True])
def test_sandwich_rmsnorm(half: bool) -> None:
    rng = np.random.default_rng(1)
    feeds = {
        "x": (rng.standard_normal((2, 3, 16)) * 4).astype(np.float16 if half else np.float32),
        "residual": (rng.standard_normal((2, 3, 16)) * 40).astype(np.float32),
        "post_scale": np.linspace(0.5, 1.5, 16, dtype=np.float32),
        "pre_scale": np.linspace(2, 1, 16, dtype=np.float32),
    }
    _check(sandwich_rmsnorm, feeds, {"epsilon": 1e-6})


@pytest.mark.parametrize("half", [False, True])
def test_attention(half: bool) -> None:
    rng = np.random.default_rng(2)
    dt = np.float16 if half else np.float32
    mask = np.ones((2, 9), np.int64)
    mask[1, :2] = 0
    feeds = {
        "query": rng.standard_normal((2, 4, 3, 8)).astype(dt),
        "key": rng.standard_normal((2, 2, 3, 8)).astype(dt),
        "value": rng.standard_normal((2, 2, 3, 8)).astype(dt),
        "past_key": rng.standard_normal((2, 2, 6, 8)).astype(dt),
        "past_value": rng.standard_normal((2, 2, 6, 8)).astype(dt),
        "attention_mask": mask,
    }
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 8, "scale": 8**-0.5, "softcap": 5.0, "window": 4}
    _check(attention, feeds, attrs)


def test_unknown_dtype_is_a_one_line_error() -> None:
    proto = _model(softcap, {"x": (TP.FLOAT, [2])}, {"cap": 3.0})
    del proto.graph.input[:]  # no type for x anywhere
    with pytest.raises(ort_ops.PluginOpError, match="dtype of 'x' is unknown"):
        ort_ops.runnable(proto)


def test_graphs_without_plugins_pass_through(tmp_path) -> None:
    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", TP.FLOAT, [2])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    sess = ort_ops.inference_session(tmp_path / "m.onnx")
    assert sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]

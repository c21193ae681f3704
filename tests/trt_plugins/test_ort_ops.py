"""trt_plugins.ort_ops: onnxruntime runs each plugin node as exactly its PyTorch reference, in the
graph's own dtypes (fp16 inputs are carried through fp32 and converted back, losslessly)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h

from trt_plugins import attention, attention_inplace, ort_ops, sandwich_rmsnorm, softcap
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


def _session(
    module, feeds: dict[str, np.ndarray], attrs: dict, dims: dict | None = None
) -> tuple[Any, onnx.ModelProto]:
    """A session of one plugin node; `dims` names inputs' shapes (symbolic dims), else the feeds' shapes."""
    types = {
        n: (
            TP.INT64 if a.dtype == np.int64 else TP.FLOAT16 if a.dtype == np.float16 else TP.FLOAT,
            (dims or {}).get(n, list(a.shape)),
        )
        for n, a in feeds.items()
    }
    proto = _model(module, types, attrs)
    so = ort.SessionOptions()
    ort_ops.register(so)
    return ort.InferenceSession(ort_ops.runnable(proto).SerializeToString(), so), proto


def _reference(module, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The reference on copies of the feeds (in-place plugins write their pasts), with the node's attributes."""
    stored = module.SPEC.parse({a.name: h.get_attribute_value(a) for a in proto.graph.node[0].attribute})
    stored = {a.name: stored[a.name] for a in module.SPEC.attrs}  # as the node holds them (fp32 floats)
    want = module.reference(*(torch.from_numpy(a.copy()) for a in feeds.values()), **stored)
    return want if isinstance(want, tuple) else (want,)


def _check(module, feeds: dict[str, np.ndarray], attrs: dict) -> None:
    sess, proto = _session(module, feeds, attrs)
    before = {n: a.copy() for n, a in feeds.items()}
    got = sess.run(None, feeds)
    for n, a in feeds.items():
        np.testing.assert_array_equal(a, before[n], err_msg=f"the op wrote its input {n}")
    for g, w in zip(got, _reference(module, proto, feeds), strict=True):
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


def _inplace_feeds(half: bool, s: int, slots: int, firsts: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(s * 31 + slots)
    dt = np.float16 if half else np.float32
    b = len(firsts)
    return {
        "query": rng.standard_normal((b, 4, s, 8)).astype(dt),
        "key": rng.standard_normal((b, 2, s, 8)).astype(dt),
        "value": rng.standard_normal((b, 2, s, 8)).astype(dt),
        "past_key": rng.standard_normal((b, 2, slots, 8)).astype(dt),  # stale data in every slot
        "past_value": rng.standard_normal((b, 2, slots, 8)).astype(dt),
        "position_ids": np.asarray(firsts, np.int64)[:, None] + np.arange(s),
    }


INPLACE = [  # (window, S, slots, first position per row)
    pytest.param(4, 3, 8, [13, -2], id="sliding-ring-wrap-and-padding"),
    pytest.param(4, 11, 8, [0, -3], id="sliding-prompt-longer-than-ring"),
    pytest.param(4, 1, 8, [21, 2], id="sliding-decode-rows-apart"),
    pytest.param(0, 3, 20, [13, -2], id="global-chunk-and-padding"),
    pytest.param(0, 1, 20, [17, 0], id="global-decode-rows-apart"),
]


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize(("window", "s", "slots", "firsts"), INPLACE)
def test_attention_inplace(half: bool, window: int, s: int, slots: int, firsts: list[int]) -> None:
    """The op returns the presents (the pasts after this step's write) and leaves its inputs alone."""
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 8, "scale": 8**-0.5, "softcap": 5.0, "window": window}
    _check(attention_inplace, _inplace_feeds(half, s, slots, firsts), attrs)


@pytest.mark.parametrize("half", [False, True])
def test_attention_inplace_with_past_and_present_bound_to_one_buffer(half: bool) -> None:
    """How the in-place runners use it: one buffer bound as past and present (IOBinding) holds the written
    cache after the run, and the output is the reference's, over a prefill and a decode step."""
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 8, "scale": 8**-0.5, "softcap": 5.0, "window": 4}
    feeds = _inplace_feeds(half, 6, 8, [2, -1])
    cache = {n: feeds[n].copy() for n in ("past_key", "past_value")}
    q, kv, cache_dims = ["B", 4, "S", 8], ["B", 2, "S", 8], ["B", 2, 8, 8]
    dims = dict(zip(feeds, (q, kv, kv, cache_dims, cache_dims, ["B", "S"]), strict=True))
    sess, proto = _session(attention_inplace, feeds, attrs, dims)
    for step in (feeds, _inplace_feeds(half, 1, 8, [8, 5])):  # a prefill, then the decode step after it
        want = _reference(attention_inplace, proto, {**step, **cache})
        io = sess.io_binding()
        io.bind_output("out")
        for name in ("query", "key", "value", "position_ids"):
            io.bind_cpu_input(name, step[name])
        for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
            buf = cache[past]
            io.bind_input(past, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
            io.bind_output(present, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        sess.run_with_iobinding(io)
        np.testing.assert_array_equal(io.copy_outputs_to_cpu()[0], want[0].numpy())
        np.testing.assert_array_equal(cache["past_key"], want[1].numpy())
        np.testing.assert_array_equal(cache["past_value"], want[2].numpy())
        outputs = io.get_outputs()
        assert outputs[1].data_ptr() == cache["past_key"].ctypes.data  # present is the past's buffer


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

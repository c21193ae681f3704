"""Small hand-built ONNX graphs for the pass tests, and helpers to run passes and onnxruntime on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from export.config import Gemma2Config
from graph_passes.driver import Pass
from graph_passes.graph import INTERNAL_DOMAIN, PassGraph, all_nodes
from graph_passes.report import PassReport
from trt_plugins import ort_ops

F32, F16 = TP.FLOAT, TP.FLOAT16
FP32_BOUND = 1e-4  # max |diff| of fp32 outputs, the bound (passes measure ~1e-5: rounding order only)


def vi(name: str, elem: int = F32, shape: Sequence[int | str] | None = None) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def const(name: str, value: np.ndarray | float | Sequence[int], dtype: type = np.float32) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value, dtype=dtype), name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 18,
) -> onnx.ModelProto:
    graph = h.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


def rmsnorm_nodes(x: str, scale: str, out: str, p: str, form: str = "dynamo") -> tuple[list, list]:
    """One decomposed RMSNorm (the exporters' forms) reading `x` and writing `out`."""
    inits = [const(f"{p}two", 2.0), const(f"{p}eps", 1e-6), const(f"{p}axes", [-1], np.int64), const(f"{p}one", 1.0)]
    nodes = [h.make_node("Pow", [x, f"{p}two"], [f"{p}sq"])]
    if form == "torchscript":  # opset < 18: ReduceMean axes attribute, Div(1, Sqrt)
        nodes += [h.make_node("ReduceMean", [f"{p}sq"], [f"{p}mean"], axes=[-1], keepdims=1)]
    else:
        nodes += [h.make_node("ReduceMean", [f"{p}sq", f"{p}axes"], [f"{p}mean"], keepdims=1)]
    if form == "no-eps":
        nodes += [h.make_node("Sqrt", [f"{p}mean"], [f"{p}sqrt"])]
    else:
        nodes += [
            h.make_node("Add", [f"{p}mean", f"{p}eps"], [f"{p}var"]),
            h.make_node("Sqrt", [f"{p}var"], [f"{p}sqrt"]),
        ]
    if form == "torchscript":
        nodes += [h.make_node("Div", [f"{p}one", f"{p}sqrt"], [f"{p}inv"])]
    else:
        nodes += [h.make_node("Reciprocal", [f"{p}sqrt"], [f"{p}inv"])]
    nodes += [h.make_node("Mul", [x, f"{p}inv"], [f"{p}normed"])]
    if form == "llama-fp16":  # Llama: weight * normed.to(input dtype), the cast before the weight
        nodes += [
            h.make_node("Cast", [f"{p}normed"], [f"{p}half"], to=F16),
            h.make_node("Mul", [scale, f"{p}half"], [out]),
        ]
    else:
        nodes += [h.make_node("Mul", [f"{p}normed", scale], [out])]
    return nodes, inits


def apply(
    proto: onnx.ModelProto, *passes: Pass, config: Gemma2Config | None = None
) -> tuple[onnx.ModelProto, list[PassReport]]:
    g = PassGraph.from_proto(proto)
    reports = [p(g, config) for p in passes]
    return g.to_proto(), reports


def session(proto_or_path: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    """onnxruntime, graph optimizations off (so it runs what the passes wrote); plugin nodes as reference ops."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(proto_or_path, onnx.ModelProto):
        proto = proto_or_path
        if ort_ops.uses_plugin_ops(proto):
            ort_ops.register(so)
            proto = ort_ops.runnable(proto)
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort_ops.inference_session(proto_or_path, so)


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(proto).run(None, feeds)


def ops(proto: onnx.ModelProto) -> list[str]:
    """Op types of the graph's nodes and of the nodes inside its subgraphs (If branches)."""
    return [n.op_type for n in all_nodes(proto.graph)]


def top_ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def prefill_feeds(cfg: Gemma2Config, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Batch 2 with left padding, a prompt longer than the window (deploy/verify/parity.py's second case)."""
    from deploy.verify.parity import parity_cases, position_ids
    from export import io_contract as io

    case = parity_cases(cfg)[1]
    feeds = {
        io.INPUT_IDS: case.input_ids,
        io.ATTENTION_MASK: case.attention_mask,
        io.POSITION_IDS: position_ids(case.attention_mask),
    }
    empty = np.zeros((2, cfg.num_key_value_heads, 0, cfg.head_dim), dtype)
    return feeds | {n: empty for n in io.past_names(cfg)}


def max_output_diff(before: onnx.ModelProto, after: onnx.ModelProto, weights_dir: Path, feeds: dict) -> float:
    """Max |diff| over every output (logits and presents) of two graphs sharing `weights_dir`'s data.

    Left-padded positions are undefined by contract and left out (deploy/verify/parity.py): logits of padded
    query rows, cache entries of padded keys (no valid query ever attends to them).
    """
    outs = []
    for proto in (before, after):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if ort_ops.uses_plugin_ops(proto):
            ort_ops.register(so)
            proto = ort_ops.runnable(proto)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, feeds))
    valid = feeds["attention_mask"][:, -outs[0][0].shape[1] :].astype(bool)
    worst = float(np.abs(outs[0][0] - outs[1][0])[valid].max())
    mask = feeds["attention_mask"].astype(bool)
    for a, b in zip(outs[0][1:], outs[1][1:], strict=True):
        keys = mask[:, -a.shape[2] :][:, None, :, None]
        worst = max(worst, float(np.abs(a.astype(np.float64) - b)[np.broadcast_to(keys, a.shape)].max()))
    return worst


def node_model(
    op: str,
    domain: str,
    inputs: Sequence[tuple[str, int, Sequence[int | str]]],
    outputs: Sequence[tuple[str, int, Sequence[int | str]]],
    initializers: Sequence[onnx.TensorProto] = (),
    **attrs: object,
) -> onnx.ModelProto:
    """A graph of one node (a plugin or internal op) with typed inputs/outputs, for lowering tests."""
    names = [n for n, _, _ in inputs] + [t.name for t in initializers]
    node = h.make_node(op, names, [n for n, _, _ in outputs], domain=domain, **attrs)
    graph = h.make_graph([node], op, [vi(*i) for i in inputs], [vi(*o) for o in outputs], list(initializers))
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(domain, 1)])
    m.ir_version = 10
    return m


NORM_SCALE = np.linspace(0.5, 1.5, 16).astype(np.float32)


def fused_rmsnorm_model(domain: str = INTERNAL_DOMAIN) -> onnx.ModelProto:
    """One fused RMSNorm node (x [2, 3, 16], scale NORM_SCALE, eps 1e-6): the input of the lowering passes."""
    x, y = ("x", F32, [2, 3, 16]), ("y", F32, [2, 3, 16])
    return node_model("RMSNorm", domain, [x], [y], [const("scale", NORM_SCALE)], epsilon=1e-6)

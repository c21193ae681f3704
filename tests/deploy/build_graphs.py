"""Small hand-made ONNX graphs for the engine-build tests: they keep g2trt's I/O contract names (so
profiles are planned exactly as for a real export) but build in about a second."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from export import io_contract as io
from trt_plugins import softcap
from trt_plugins.attention import SPEC as ATTENTION

FLOATS = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def optimized(model_path: Path, target: str, out_dir: Path) -> Path:
    """The graph pass `target` ("trt-native", "trt") applied to an export; returns the new model.onnx."""
    from graph_passes.optimize import optimize

    return Path(optimize(model_path, target, out_dir).model_path)


def contract_graph(path: Path, dtype: str = "fp32", max_positions: int | None = None) -> Path:
    """input_ids / attention_mask / a global and a sliding past -> logits and presents."""
    f = FLOATS[dtype]
    kv = lambda dim: [io.BATCH, 2, dim, 8]  # noqa: E731
    inputs = [
        helper.make_tensor_value_info(io.INPUT_IDS, TensorProto.INT64, [io.BATCH, io.SEQ]),
        helper.make_tensor_value_info(io.ATTENTION_MASK, TensorProto.INT64, [io.BATCH, io.TOTAL]),
        helper.make_tensor_value_info(io.past_name(0, "key"), f, kv(io.SLIDING_PAST)),
        helper.make_tensor_value_info(io.past_name(1, "key"), f, kv(io.PAST)),
    ]
    outputs = [
        helper.make_tensor_value_info(io.LOGITS, TensorProto.FLOAT, [io.BATCH, io.SEQ]),
        helper.make_tensor_value_info(io.present_name(0, "key"), f, kv(io.SLIDING_PAST)),
        helper.make_tensor_value_info(io.present_name(1, "key"), f, kv(io.PAST)),
    ]
    nodes = [
        helper.make_node("Cast", [io.INPUT_IDS], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [io.ATTENTION_MASK], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_f", "axes"], ["count"], keepdims=1),
        helper.make_node("Mul", ["ids_f", "count"], [io.LOGITS]),
        helper.make_node("Relu", [io.past_name(0, "key")], [io.present_name(0, "key")]),
        helper.make_node("Relu", [io.past_name(1, "key")], [io.present_name(1, "key")]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "contract", inputs, outputs, [axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    if max_positions is not None:
        (path.parent / "manifest.json").write_text(f'{{"config": {{"max_position_embeddings": {max_positions}}}}}')
    return path


def softcap_graph(path: Path, cap: float = 30.0) -> Path:
    """x [batch_size, sequence_length, 16] -> g2trt SoftCap -> Relu: a graph with one plugin node."""
    spec = softcap.SPEC
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [io.BATCH, io.SEQ, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [io.BATCH, io.SEQ, 16])
    nodes = [
        helper.make_node(spec.name, ["x"], ["capped"], name="cap0", domain=spec.domain, **spec.attributes(cap=cap)),
        helper.make_node("Relu", ["capped"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "softcap", [x], [y])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(spec.domain, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def attention_node(name: str = "attn0") -> onnx.NodeProto:
    """A SlidingWindowAttention node whose attributes onnx.helper writes sorted by name (not spec order)."""
    attrs = ATTENTION.attributes(num_heads=4, kv_heads=2, head_dim=32, scale=32**-0.5, softcap=50.0, window=16)
    return helper.make_node(
        ATTENTION.name, list(ATTENTION.inputs), list(ATTENTION.outputs), name=name, domain=ATTENTION.domain, **attrs
    )

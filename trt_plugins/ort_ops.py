"""onnxruntime runs the g2trt plugin ops as their PyTorch references, so a `trt`-target graph is
checked numerically on a CPU-only machine, token for token, before any engine is built.

How: onnxruntime-extensions hosts Python custom ops, but only in its own domain (`ai.onnx.contrib`)
and only for fp32/int types (an fp16 Python op aborts the process). So a trt graph is given to
onnxruntime as a *runnable copy*, made in memory:

    g2trt:SandwichRMSNorm(x fp16, residual fp32, ...)
      ─>  Cast(f32) ─ ai.onnx.contrib:G2trtSandwichRMSNorm(dtypes="float16,float32,...|float32,float16") ─ Cast(f16)

The op converts its fp32 inputs back to the recorded dtypes (exact: fp16/bf16 ⊂ fp32), calls the
plugin module's `reference` (the same function the Triton kernels and TensorRT plugins are tested
against), and returns fp32 (exact again), so the copy computes what the reference computes in the
graph's own dtypes, bit for bit. Float attributes travel as decimal strings (the extension rounds
float attributes to 6 digits). The weights are not copied: the session reads the original data file.

    session = ort_ops.inference_session("trt/model.onnx", session_options)   # any g2trt graph

In-place plugins (a module with `ALIASES`, output index -> input index: SlidingWindowAttentionInplace,
whose presents are its pasts' memory): the reference writes its pasts, so the op hands it copies of them
(onnxruntime-extensions 0.15 already passes the op copies of its inputs; the op does not rely on that) and
returns the presents as new arrays, which onnxruntime writes into the present outputs, bound to the pasts'
own buffers by the in-place runners. Verification only: that copy is what the TensorRT plugin avoids.

Python ops run on numpy through the GIL: fine for verification, not for timing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.errors import G2trtError
from trt_plugins import PLUGINS
from trt_plugins.spec import DOMAIN, PluginSpec

CONTRIB = "ai.onnx.contrib"
OP_PREFIX = "G2trt"
_INT_INPUTS = {"attention_mask", "position_ids"}  # every other plugin input/output is floating point
_WIDENED = ("float16", "bfloat16")  # carried through fp32 (the Python op API has no fp16)
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_TYPES = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16,
}
_ONNX_NAMES = {v: k for k, v in _ONNX_TYPES.items()}


class PluginOpError(G2trtError, RuntimeError):
    """A trt-target graph whose plugin nodes cannot be made runnable on onnxruntime."""


def _extensions() -> Any:
    try:
        import onnxruntime_extensions
    except ImportError as e:
        raise PluginOpError(f"onnxruntime-extensions is needed to run g2trt plugin ops on CPU ({e})") from None
    return onnxruntime_extensions


@functools.cache
def _register_python_ops() -> str:
    """Declare one Python op per plugin (once per process); returns the extensions library path."""
    ext = _extensions()
    for module in PLUGINS.values():
        _declare(ext, module)
    return ext.get_library_path()


def _declare(ext: Any, module: ModuleType) -> None:
    spec: PluginSpec = module.SPEC
    dt = ext.PyCustomOpDef
    inputs = [dt.dt_int64 if n in _INT_INPUTS else dt.dt_float for n in spec.inputs]
    outputs = [dt.dt_float for _ in spec.outputs]
    # floats travel as strings: the extension hands float attributes to Python rounded to 6 digits
    attrs = {a.name: dt.dt_int64 if a.type == "int" else dt.dt_string for a in spec.attrs} | {"dtypes": dt.dt_string}

    written = set(getattr(module, "ALIASES", {}).values())  # inputs the reference writes (copied first)

    def compute(*arrays: np.ndarray, dtypes: str, **attributes: Any) -> tuple[np.ndarray, ...] | np.ndarray:
        in_types, out_types = (s.split(",") for s in dtypes.split("|"))
        tensors = [
            torch.from_numpy(np.array(a) if i in written else np.ascontiguousarray(a)).to(_TORCH[t])
            if t in _TORCH
            else torch.from_numpy(a)
            for i, (a, t) in enumerate(zip(arrays, in_types, strict=True))
        ]
        values = spec.parse({k: float(v) if isinstance(v, str) else v for k, v in attributes.items()})
        result = module.reference(*tensors, **{a.name: values[a.name] for a in spec.attrs})
        results = result if isinstance(result, tuple) else (result,)
        out = tuple(r.float().numpy() for r in results)
        if len(out) != len(out_types):
            raise PluginOpError(f"{spec.name} reference returned {len(out)} outputs, spec has {len(out_types)}")
        return out if len(out) > 1 else out[0]

    ext.onnx_op(op_type=OP_PREFIX + spec.name, inputs=inputs, outputs=outputs, attrs=attrs)(compute)


def register(so: ort.SessionOptions) -> None:
    """Register the Python reference ops with `so` (a runnable copy of the graph still needs `runnable`)."""
    so.register_custom_ops_library(_register_python_ops())


def uses_plugin_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN and n.op_type in PLUGINS for n in model.graph.node)


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose plugin nodes are the registered Python ops (see module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = _elem_types(model)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        is_plugin = node.domain == DOMAIN and node.op_type in PLUGINS
        nodes.extend(_python_op(node, types) if is_plugin else [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]  # no g2trt node is left
    del model.opset_import[:]
    model.opset_import.extend([*kept, onnx.helper.make_opsetid(CONTRIB, 1)])
    return model


def _python_op(node: onnx.NodeProto, types: dict[str, str]) -> list[onnx.NodeProto]:
    """Cast(f32) inputs -> the Python op -> Cast back outputs, for one plugin node."""
    module = PLUGINS[node.op_type]
    spec: PluginSpec = module.SPEC
    in_types = [_type_of(types, t, node) for t in node.input]
    out_types = list(module.output_dtypes(*in_types))  # the spec's dtype rule
    for name, t in zip(node.output, out_types, strict=True):
        if types.get(name, t) != t:
            raise PluginOpError(f"plugin node {node.name}: {name} is {types[name]}, the spec's rule says {t}")
    before, ins, after, outs = [], [], [], []
    for name, t in zip(node.input, in_types, strict=True):
        if t in _WIDENED:
            ins.append(f"{name}/{node.name}/f32")
            before.append(onnx.helper.make_node("Cast", [name], [ins[-1]], to=onnx.TensorProto.FLOAT))
        else:
            ins.append(name)
    for name, t in zip(node.output, out_types, strict=True):
        if t in _WIDENED:
            outs.append(f"{name}/{node.name}/f32")
            after.append(onnx.helper.make_node("Cast", [outs[-1]], [name], to=_ONNX_TYPES[t]))
        else:
            outs.append(name)
    parsed = spec.parse({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    attrs = {a.name: repr(parsed[a.name]) if a.type == "float" else parsed[a.name] for a in spec.attrs}
    dtypes = ",".join(in_types) + "|" + ",".join(out_types)
    op = onnx.helper.make_node(OP_PREFIX + spec.name, ins, outs, name=node.name, domain=CONTRIB, dtypes=dtypes, **attrs)
    return [*before, op, *after]


def session_options(model_path: str | Path, so: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """`so` with the reference ops registered and the weights read from beside the original model."""
    so = so or ort.SessionOptions()
    register(so)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(model_path).parent))
    return so


def inference_session(
    model_path: str | Path, so: ort.SessionOptions | None = None, providers: list[str] | None = None
) -> ort.InferenceSession:
    """An onnxruntime session of any g2trt graph, plugin nodes included (weights read in place)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    if not uses_plugin_ops(proto):
        return ort.InferenceSession(str(model_path), so, providers=providers or ["CPUExecutionProvider"])
    so = session_options(model_path, so)
    return ort.InferenceSession(
        runnable(proto).SerializeToString(), so, providers=providers or ["CPUExecutionProvider"]
    )


def _elem_types(model: onnx.ModelProto) -> dict[str, str]:
    g = model.graph
    out: dict[str, str] = {}
    for v in [*g.input, *g.output, *g.value_info]:
        et = v.type.tensor_type.elem_type
        out[v.name] = _ONNX_NAMES.get(et, "int64" if et == onnx.TensorProto.INT64 else f"type{et}")
    for init in g.initializer:
        out[init.name] = _ONNX_NAMES.get(init.data_type, f"type{init.data_type}")
    return out


def _type_of(types: dict[str, str], name: str, node: onnx.NodeProto) -> str:
    t = types.get(name)
    if t is None or not (t in _TORCH or t == "int64"):
        raise PluginOpError(f"plugin node {node.name}: dtype of {name!r} is {t or 'unknown'} (no value_info)")
    return t

"""g2trt's plugins for the full TensorRT (>= 10.15): `tensorrt.plugin` with ahead-of-time Triton kernels.

Not run on a GPU: the machines g2trt is developed on have neither a GPU nor TensorRT's libraries. The
tests run this registration through TensorRT 11.4's own `tensorrt.plugin` (its pure-Python validators and
AOT plugin class) over a stand-in for the compiled module, and replay the builder's calls on the real
plugin class (tests/trt_plugins/real_tensorrt_plugin.py); TensorRT's C++ builder has never called it.

Why `tensorrt.plugin` (quickly deployable plugins) with `@aot_impl` rather than a C++ IPluginV3: the
kernel is compiled here (Triton -> PTX) and embedded in the engine, so the engine runs from trtexec or a
C++ runtime with no Python and no plugin library to ship; and the plugin is a few lines derived from the
plugin specs (trt_plugins/spec.py and the op modules), not a second hand-written definition of each op.

Per plugin (trt_plugins.PLUGINS), registered under "g2trt::<name>" (spec.namespace, version "1"):
  * `@register`: inputs as TensorDescs, the spec's attributes as int/float; output shapes from the op
    module's `output_shapes` evaluated on TensorRT shape expressions, dtypes from its `output_dtypes`.
    An output the op module lists in `ALIASES` (SlidingWindowAttentionInplace's presents) is returned as
    `input.aliased()`: tensorrt.plugin then answers TensorRT's `getAliasedInput` (IPluginV3OneBuildV2) with
    that input, and the kernel gets one buffer for both. TensorRT asks only when the builder config has
    `PreviewFeature.ALIASED_PLUGIN_IO_10_03` on (`enable_aliased_plugin_io`, called by g2trt build).
  * `@aot_impl`: `trt_plugins.aot.compile_kernel(...)` for this node's attributes, dtypes and static dims;
    returns (kernel name, PTX, launch grid/block/shared memory, int32 scalar arguments) with the kernel's
    parameters in TensorRT's order: input pointers, int32 scalars, output pointers.

No `@impl` (JIT) and no `@autotune`: one AOT kernel per node, and without autotune TensorRT keeps the
strongly typed network's input types and linear formats, which is what the kernels are compiled for.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from export.errors import G2trtError
from trt_plugins import PLUGINS
from trt_plugins.spec import PluginSpec

# Attributes TensorRT's ONNX parser reads itself; everything else on a plugin node is a plugin field.
PARSER_ATTRS = ("plugin_version", "plugin_namespace", "aot")
# Static sizes a kernel module's `plan(...)` needs beyond the spec attributes: the last dim of this input.
STATIC_DIMS: dict[str, dict[str, str]] = {
    "SoftCap": {"n_cols": "x"},
    "SandwichRMSNorm": {"hidden": "residual"},
    "SlidingWindowAttention": {},
    "SlidingWindowAttentionInplace": {},
}
_REGISTERED: set[str] = set()


class PluginRegistrationError(G2trtError):
    """A plugin that cannot be registered or compiled for this TensorRT / GPU."""


def plugin_id(spec: PluginSpec) -> str:
    return f"{spec.namespace}::{spec.name}"


def kernel_arch(sm: int) -> int:
    """The arch to compile PTX for: the GPU's own where Triton AOT supports it, else the newest older one
    (PTX is JIT-compiled forward by the driver; sm_90's PTX is sm_90a, which runs on Hopper only)."""
    from trt_plugins.aot import ARCHS

    if sm in ARCHS:
        return sm
    older = [a for a in ARCHS if a <= sm and a != 90]
    if not older:
        raise PluginRegistrationError(f"no Triton AOT target for SM {sm} (supported: {', '.join(map(str, ARCHS))})")
    return max(older)


def trim_ptx_params(ptx: str, kernel: str, keep: int) -> str:
    """Drop the kernel's parameters after the first `keep` when its body never reads them.

    Triton appends `global_scratch` / `profile_scratch` pointers to every kernel; TensorRT's AOT launch
    passes only inputs, int32 scalars and outputs. With zero scratch size the body never loads them, so
    removing them from the entry's parameter list makes the PTX match the launch exactly.
    """
    entry = re.search(rf"\.entry\s+{re.escape(kernel)}\s*\((.*?)\)", ptx, re.DOTALL)
    if entry is None:
        raise PluginRegistrationError(f"kernel {kernel}: no .entry in its PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise PluginRegistrationError(f"kernel {kernel}: PTX has {len(params)} parameters, the launch passes {keep}")
    extra = [p.split()[-1] for p in params[keep:]]
    used = [name for name in extra if len(re.findall(rf"\b{re.escape(name)}\b", ptx)) > 1]
    if used:
        raise PluginRegistrationError(f"kernel {kernel}: reads {used}, which TensorRT's AOT launch does not pass")
    kept = ",\n".join(f"\t{p}" for p in params[:keep])
    return ptx[: entry.start(1)] + "\n" + kept + "\n" + ptx[entry.end(1) :]


def dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int64: "i64"}
    if dtype not in names:
        raise PluginRegistrationError(f"unsupported plugin tensor dtype {dtype}")
    return names[dtype]


def kernel_params(
    spec: PluginSpec, attrs: dict[str, Any], dtypes: Sequence[str], last_dims: Sequence[int | None]
) -> tuple[str, dict[str, Any]]:
    """(dtype, `compile_kernel` keyword arguments) for one node: its attributes, per-input dtypes, static dims."""
    floats = {n: d for n, d in zip(spec.inputs, dtypes, strict=True) if d != "i64"}
    params: dict[str, Any] = {a.name: attrs[a.name] for a in spec.attrs}
    params["tensor_dtypes"] = floats
    for param, tensor in STATIC_DIMS[spec.name].items():
        dim = last_dims[spec.inputs.index(tensor)]
        if dim is None:
            raise PluginRegistrationError(f"plugin {spec.name}: the last dim of {tensor!r} must be static")
        params[param] = dim
    return next(iter(floats.values())), params


def _signature(params: list[inspect.Parameter], returns: Any) -> inspect.Signature:
    return inspect.Signature(params, return_annotation=returns)


def aot_returns(trtp: Any) -> Any:
    """The return annotation `tensorrt.plugin` requires of an `aot_impl` (TensorRT 10.15 through 11.4 raise "No
    return annotation found for aot_impl function" without it): kernel name, PTX, launch, scalar arguments."""
    return tuple.__class_getitem__((bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs))


def _register_one(trt: Any, trtp: Any, module: ModuleType, arch: int, compile_kernel: Callable[..., Any]) -> None:
    spec: PluginSpec = module.SPEC
    if spec.version != "1":  # tensorrt.plugin registers every creator as version "1"
        raise PluginRegistrationError(f"plugin {spec.name}: version {spec.version}; tensorrt.plugin only has 1")
    n_in, n_out = len(spec.inputs), len(spec.outputs)
    attr_types = {a.name: (int if a.type == "int" else float) for a in spec.attrs}
    tensor = inspect.Parameter.POSITIONAL_OR_KEYWORD
    in_params = [inspect.Parameter(n, tensor, annotation=trtp.TensorDesc) for n in spec.inputs]
    attr_params = [inspect.Parameter(n, tensor, annotation=t) for n, t in attr_types.items()]
    out_tuple = tuple.__class_getitem__((trtp.TensorDesc,) * n_out)
    aliases: dict[int, int] = dict(getattr(module, "ALIASES", {}))  # output index -> the input it writes

    def describe(*inputs: Any, **attrs: Any) -> tuple[Any, ...]:
        shapes = module.output_shapes(*[t.shape_expr for t in inputs])
        dtypes = module.output_dtypes(*[t.dtype for t in inputs])
        return tuple(
            inputs[aliases[i]].aliased()  # the very input object: tensorrt.plugin maps aliases by identity
            if i in aliases
            else trtp.from_shape_expr(s if isinstance(s, trtp.ShapeExprs) else tuple(s), dtype=d)
            for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
        )

    describe.__signature__ = _signature(in_params + attr_params, out_tuple)  # type: ignore[attr-defined]
    describe.__name__ = f"{spec.name}_describe"

    def aot(*args: Any) -> tuple[bytes, bytes, Any, Any]:
        inputs, values, outputs = args[:n_in], args[n_in : n_in + len(attr_types)], args[-2]
        attrs = dict(zip(attr_types, values, strict=True))
        del outputs  # shapes come from the inputs; output pointers follow the scalars
        last_dims = [t.shape_expr[-1].constant_value() if t.shape_expr[-1].is_constant else None for t in inputs]
        dtype, params = kernel_params(spec, attrs, [dtype_name(trt, t.dtype) for t in inputs], last_dims)
        k = compile_kernel(spec.name, arch, dtype, **params)
        shapes = [t.shape_expr for t in inputs]
        grid = k.grid(shapes, trtp.cdiv)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = grid
        launch.block_x = k.threads_per_block
        launch.shared_mem = k.shared_mem
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in k.scalars(shapes)])
        keep = len(k.input_args) + len(k.scalar_args) + len(k.output_args)
        return k.name.encode(), trim_ptx_params(k.ptx, k.name, keep).encode(), launch, scalars

    outputs_param = inspect.Parameter("outputs", tensor, annotation=out_tuple)
    tactic_param = inspect.Parameter("tactic", tensor, annotation=int)
    returns = aot_returns(trtp)
    aot.__signature__ = _signature(in_params + attr_params + [outputs_param, tactic_param], returns)  # type: ignore[attr-defined]
    aot.__name__ = f"{spec.name}_aot"

    try:
        trtp.register(plugin_id(spec))(describe)
        trtp.aot_impl(plugin_id(spec))(aot)
    except ValueError as e:  # tensorrt.plugin's validators: one line, naming the plugin
        raise PluginRegistrationError(f"tensorrt.plugin refused {plugin_id(spec)}: {e}") from None


def register_plugins(trt: Any, target_sm: int, compile_kernel: Callable[..., Any] | None = None) -> list[str]:
    """Register every g2trt plugin with `tensorrt.plugin` (idempotent); returns the plugin ids.

    `trt` is the imported `tensorrt` module; `target_sm` the GPU the engine is built for (kernels are
    compiled to PTX for it). TensorRT-RTX has no `tensorrt.plugin` and aborts on Python plugins.
    """
    try:
        import tensorrt.plugin as trtp  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise PluginRegistrationError(
            f"tensorrt.plugin is not available ({e}): needs the full TensorRT >= 10.15"
        ) from e
    if not hasattr(trtp, "aot_impl"):
        raise PluginRegistrationError("this TensorRT's tensorrt.plugin has no aot_impl: needs TensorRT >= 10.15")
    if compile_kernel is None:
        from trt_plugins.aot import compile_kernel as default_compile

        compile_kernel = default_compile
    arch = kernel_arch(target_sm)
    ids = []
    for module in PLUGINS.values():
        pid = plugin_id(module.SPEC)
        if pid not in _REGISTERED:
            _register_one(trt, trtp, module, arch, compile_kernel)
            _REGISTERED.add(pid)
        ids.append(pid)
    return ids


def enable_aliased_plugin_io(trt: Any, config: Any) -> None:
    """Turn on plugin I/O aliasing in a builder config: without `PreviewFeature.ALIASED_PLUGIN_IO_10_03`
    TensorRT never asks a plugin for aliases, and an in-place plugin's presents would not be its pasts."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if feature is None:
        raise PluginRegistrationError(
            "this TensorRT has no PreviewFeature.ALIASED_PLUGIN_IO_10_03 (plugin I/O aliasing, TensorRT >= 10.3), "
            "which the in-place attention plugin needs"
        )
    config.set_preview_feature(feature, True)


def canonical_plugin_model(onnx_path: str | Path) -> bytes:
    """The graph (external weights stay on disk) with plugin nodes' attributes in spec order and `aot=1`.

    tensorrt.plugin hands the node's attribute values to `aot_impl` positionally in the order the parser
    read them; exporters write attributes in any order (onnx.helper sorts them by name), so they are put in
    the spec's order here. `aot=1` asks the parser for the AOT implementation.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        module = PLUGINS.get(node.op_type)
        if module is None:
            continue
        spec: PluginSpec = module.SPEC
        by_name = {a.name: a for a in node.attribute}
        missing = [a.name for a in spec.attrs if a.name not in by_name]
        if missing:
            raise PluginRegistrationError(
                f"{onnx_path}: {node.op_type} node {node.name!r} lacks attribute(s) {missing}"
            )
        ordered = [by_name[a.name] for a in spec.attrs] + [by_name[n] for n in PARSER_ATTRS[:2] if n in by_name]
        ordered.append(onnx.helper.make_attribute("aot", 1))
        del node.attribute[:]
        node.attribute.extend(ordered)
    return bytes(model.SerializeToString())

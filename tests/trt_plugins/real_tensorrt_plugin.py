"""The real `tensorrt.plugin` (TensorRT 11.4's pure-Python layer) on a machine without TensorRT's libraries.

`tensorrt-cu13-bindings` (a dev dependency, 1.3 MB) ships `tensorrt_bindings/plugin/`: the decorators,
their validators (`_validate.py`), the plugin creator and the AOT plugin class TensorRT calls while it
builds. Only its compiled module (`tensorrt_bindings/tensorrt.so`) needs the libraries, so it is never
imported: the plugin package is loaded from the wheel's files as `tensorrt.plugin`, over `NATIVE`, a
stand-in for the few classes and enums of the compiled module the pure-Python layer touches. Nothing of
TensorRT is copied here; the stand-in only implements the native semantics those files rely on:

  * `IExprBuilder` / `IDimensionExpr`: dimension expressions evaluated on ints, with TensorRT's
    operations (SUM, PROD, FLOOR_DIV, CEIL_DIV, ...) and constant-ness propagated as TensorRT does.
  * enums (`DataType`, `PluginFieldType`, ...) and plain-data classes (`PluginField`, `DimsExprs`, ...).
  * a plugin registry that keeps the creators `tensorrt.plugin.register` hands it.

`build_time_calls` then replays, on one registered plugin, the calls TensorRT's builder makes on a
`tensorrt.plugin` AOT plugin (create_plugin with the node's attributes, output types, output shapes,
format combinations, launch parameters, kernel), so g2trt's `describe` / `aot` run inside the real
plugin class, not beside it.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import operator
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_PACKAGE = "tensorrt_bindings"  # from tensorrt-cu13-bindings==11.4.0.106


def plugin_dir() -> Path | None:
    """`tensorrt_bindings/plugin/` of the installed bindings wheel (without importing its native module)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "plugin"
    return path if (path / "_validate.py").is_file() else None


# --- the native module's part that tensorrt.plugin uses --------------------------------------------------


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


DimensionOperation = enum.IntEnum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV", start=0)
PluginFieldType = enum.IntEnum(
    "PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 INT64 FP8 INT4", start=0
)
TensorFormat = enum.IntEnum("TensorFormat", "LINEAR CHW2 HWC8", start=0)
QuickPluginCreationRequest = enum.IntEnum(
    "QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT", start=0
)
TensorRTPhase = enum.IntEnum("TensorRTPhase", "BUILD RUNTIME", start=0)
PluginArgType = enum.IntEnum("PluginArgType", "INT", start=0)
PluginArgDataType = enum.IntEnum("PluginArgDataType", "INT8 INT16 INT32", start=0)

_OPS = {
    DimensionOperation.SUM: operator.add,
    DimensionOperation.PROD: operator.mul,
    DimensionOperation.MAX: max,
    DimensionOperation.MIN: min,
    DimensionOperation.SUB: operator.sub,
    DimensionOperation.EQUAL: lambda a, b: int(a == b),
    DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: operator.floordiv,
    DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IDimensionExpr:
    """A dimension expression with a known value (what the stand-in evaluates) and TensorRT's constant-ness:
    a build-time constant, or a dynamic dim whose value here is the one this test instantiates it at."""

    def __init__(self, value: int, constant: bool) -> None:
        self.value, self.constant = int(value), constant

    def is_constant(self) -> bool:
        return self.constant

    def get_constant_value(self) -> int:
        if not self.constant:
            raise RuntimeError("get_constant_value() of a dynamic dimension (TensorRT returns garbage here)")
        return self.value

    def is_size_tensor(self) -> bool:
        return False


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value, True)

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        for e in (a, b):
            if not isinstance(e, IDimensionExpr):
                raise TypeError(f"IExprBuilder.operation takes IDimensionExprs, got {type(e).__name__}")
        return IDimensionExpr(_OPS[op](a.value, b.value), a.constant and b.constant)


class ISymExpr:
    def __init__(self) -> None:
        pass


class Dims(tuple):  # type: ignore[type-arg]
    MAX_DIMS = 8

    def __new__(cls, dims: Any = ()) -> Dims:
        return super().__new__(cls, [0] * dims if isinstance(dims, int) else dims)


class DimsExprs(list):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        super().__init__([None] * n)


class PluginTensorDesc:
    def __init__(self) -> None:
        self.dims: Dims = Dims()
        self.type: DataType = DataType.FLOAT
        self.format = TensorFormat.LINEAR
        self.scale = 1.0


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc) -> None:
        self.desc = desc
        self.min = self.opt = self.max = desc.dims


class PluginField:
    def __init__(self, name: str, data: Any = None, type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):  # type: ignore[type-arg]
    pass


class _Interface:
    def __init__(self) -> None:
        pass


class ITensor:
    pass


class PluginRegistry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str) -> Any:
        return self.creators.get((name, version, namespace))


class Logger:
    WARNING = 2

    def log(self, severity: int, msg: str) -> None:
        pass


def native_stand_in() -> types.ModuleType:
    """A fresh stand-in for TensorRT's compiled module (one plugin registry per call)."""
    trt = types.ModuleType("tensorrt")
    registry = PluginRegistry()
    names = {
        "DataType": DataType,
        "DimensionOperation": DimensionOperation,
        "PluginFieldType": PluginFieldType,
        "TensorFormat": TensorFormat,
        "QuickPluginCreationRequest": QuickPluginCreationRequest,
        "TensorRTPhase": TensorRTPhase,
        "PluginArgType": PluginArgType,
        "PluginArgDataType": PluginArgDataType,
        "IDimensionExpr": IDimensionExpr,
        "IExprBuilder": IExprBuilder,
        "ISymExpr": ISymExpr,
        "Dims": Dims,
        "DimsExprs": DimsExprs,
        "PluginTensorDesc": PluginTensorDesc,
        "DynamicPluginTensorDesc": DynamicPluginTensorDesc,
        "PluginField": PluginField,
        "PluginFieldCollection": PluginFieldCollection,
        "ITensor": ITensor,
        "Logger": Logger,
        "get_plugin_registry": lambda: registry,
        "float32": DataType.FLOAT,
        "float16": DataType.HALF,
        "bfloat16": DataType.BF16,
        "int64": DataType.INT64,
        "int32": DataType.INT32,
        "int8": DataType.INT8,
        "__version__": "11.4.0.106 (stand-in for the compiled module)",
    }
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick"):  # fmt: skip
        names[name] = type(name, (_Interface,), {})
    for key, value in names.items():
        setattr(trt, key, value)
    trt.__path__ = []  # a package, so `tensorrt.plugin` can live under it
    return trt


@contextlib.contextmanager
def real_tensorrt_plugin() -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """(stand-in `tensorrt`, the wheel's real `tensorrt.plugin`) installed in sys.modules for the block."""
    path = plugin_dir()
    if path is None:
        raise ModuleNotFoundError(f"{WHEEL_PACKAGE}/plugin (pip install tensorrt-cu13-bindings==11.4.0.106)")
    saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
    for k in saved:
        del sys.modules[k]
    trt = native_stand_in()
    sys.modules["tensorrt"] = trt
    try:
        spec = importlib.util.spec_from_file_location(
            "tensorrt.plugin", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        assert spec is not None and spec.loader is not None
        trtp = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt.plugin"] = trtp
        spec.loader.exec_module(trtp)
        trt.plugin = trtp  # type: ignore[attr-defined]
        yield trt, trtp
    finally:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


# --- what TensorRT's builder calls on a tensorrt.plugin AOT plugin ---------------------------------------


def _fields(trt: types.ModuleType, attrs: dict[str, Any]) -> list[Any]:
    """The node's attributes as the ONNX parser hands them to create_plugin, in the node's order."""
    out = []
    for name, value in attrs.items():
        if isinstance(value, int):
            out.append(trt.PluginField(name, np.array([value], np.int64), trt.PluginFieldType.INT64))
        else:
            out.append(trt.PluginField(name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
    return out


def _exprs(shape: Sequence[tuple[int, bool]]) -> list[IDimensionExpr]:
    return [IDimensionExpr(v, constant) for v, constant in shape]


def build_time_calls(
    trt: types.ModuleType,
    plugin_id: str,
    inputs: Sequence[tuple[Sequence[tuple[int, bool]], DataType]],
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """Replay the builder's calls on the registered plugin `plugin_id` for one node.

    `inputs`: per input, its dims as (value, is build-time constant) and its DataType; `attrs` in the order
    the parser reads them (the canonical model's: spec order). Returns what TensorRT would take from the
    plugin: output dtypes, output shapes (evaluated), kernel name and PTX, launch grid/block/shared memory
    and the scalar arguments (evaluated).
    """
    namespace, name = plugin_id.split("::")
    creator = trt.get_plugin_registry().get_creator(name, "1", namespace)
    if creator is None:
        raise LookupError(f"{plugin_id} is not in the plugin registry")
    plugin = creator.create_plugin(
        name, namespace, _fields(trt, attrs), trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT
    )
    dtypes = [d for _, d in inputs]
    out_types = plugin.get_output_data_types(dtypes, [len(s) for s, _ in inputs])
    builder = IExprBuilder()
    out_exprs = plugin.get_output_shapes([_exprs(s) for s, _ in inputs], [], builder)
    out_shapes = [tuple(e.value for e in exprs) for exprs in out_exprs]

    def desc(shape: Sequence[int], dtype: DataType) -> DynamicPluginTensorDesc:
        d = PluginTensorDesc()
        d.dims, d.type = Dims(tuple(shape)), dtype
        return DynamicPluginTensorDesc(d)

    in_out = [desc([v for v, _ in s], d) for s, d in inputs] + [
        desc(s, t) for s, t in zip(out_shapes, out_types, strict=True)
    ]
    combos = plugin.get_supported_format_combinations(in_out, len(inputs))
    plugin.configure_plugin(in_out[: len(inputs)], in_out[len(inputs) :])
    plugin.set_tactic(0)
    launch = types.SimpleNamespace()
    setter = _SymExprSetter()
    plugin.get_launch_params([_exprs(s) for s, _ in inputs], in_out, len(inputs), launch, setter, IExprBuilder())
    kernel, ptx = plugin.get_kernel([d.desc for d in in_out[: len(inputs)]], [d.desc for d in in_out[len(inputs) :]])
    value = {k: getattr(launch, k).expr.value for k in ("grid_x", "grid_y", "grid_z", "block_x", "shared_mem")}
    return {
        "output_dtypes": list(out_types),
        "output_shapes": out_shapes,
        "formats": [(c.type, c.format) for c in combos],
        "kernel": kernel,
        "ptx": ptx,
        "grid": (value["grid_x"], value["grid_y"], value["grid_z"]),
        "block_x": value["block_x"],
        "shared_mem": value["shared_mem"],
        "scalars": tuple(setter.values[i].expr.value for i in range(setter.nbSymExprs)),
    }


class _SymExprSetter:
    """What TensorRT hands get_launch_params for the kernel's scalar arguments."""

    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.values: dict[int, Any] = {}

    def __setitem__(self, index: int, value: Any) -> None:
        if index >= self.nbSymExprs:
            raise IndexError(f"scalar {index} beyond nbSymExprs {self.nbSymExprs}")
        self.values[index] = value

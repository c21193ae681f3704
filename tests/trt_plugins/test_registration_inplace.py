"""The TensorRT registration of SlidingWindowAttentionInplace: its presents are declared as aliases of its
pasts, TensorRT is asked for them (the builder's preview feature), and its AOT kernel is handed over like
the other plugins'. Driven through a small stand-in for `tensorrt.plugin` that implements `TensorDesc.aliased()`
as TensorRT 11.4's does (a clone that remembers the input it aliases), and that maps aliases to input
indices by object identity, as `tensorrt.plugin`'s plugin class does in `get_output_data_types`. TensorRT
itself never runs here (docs/build.md)."""

from __future__ import annotations

import inspect
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
import triton

from deploy.engine.build import BuildOptions, _configure
from trt_plugins import attention_inplace
from trt_plugins.aot import compile_kernel
from trt_plugins.kernels.common import int_cdiv
from trt_plugins.registration import tensorrt_qdp as qdp

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ATTRS = {"num_heads": 8, "kv_heads": 4, "head_dim": 256, "scale": 256**-0.5, "softcap": 50.0, "window": 4096}


class Dim(int):
    """A dim as TensorRT's ShapeExpr presents it: static (`constant_value`) or dynamic."""

    def __new__(cls, value: int, constant: bool = True) -> Dim:
        dim = super().__new__(cls, value)
        dim.is_constant = constant
        return dim

    def constant_value(self) -> int:
        return int(self)


class TensorDesc:
    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape_expr, self.dtype, self._aliased_to = shape, dtype, None

    def aliased(self) -> TensorDesc:
        clone = TensorDesc(self.shape_expr, self.dtype)
        clone._aliased_to = self
        return clone

    def get_aliased(self) -> TensorDesc | None:
        return self._aliased_to


class LaunchParams:
    grid_x = grid_y = grid_z = block_x = shared_mem = 1


class SymIntExprs(tuple):
    @classmethod
    def from_tuple(cls, values: tuple[int, ...]) -> SymIntExprs:
        return cls(values)


def fake_trtp(registry: dict[str, Any]) -> Any:
    def decorator(kind: str):
        return lambda pid: lambda fn: registry.setdefault(pid, {}).__setitem__(kind, fn) or fn

    return types.SimpleNamespace(
        TensorDesc=TensorDesc,
        ShapeExprs=type("ShapeExprs", (tuple,), {}),
        from_shape_expr=lambda shape, dtype: TensorDesc(tuple(shape), dtype),
        register=decorator("register"),
        aot_impl=decorator("aot_impl"),
        cdiv=int_cdiv,
        KernelLaunchParams=LaunchParams,
        SymInt32=int,
        SymIntExprs=SymIntExprs,
    )


FAKE_TRT = types.SimpleNamespace(
    float32="float32",
    float16="float16",
    bfloat16="bfloat16",
    int64="int64",
    PreviewFeature=types.SimpleNamespace(ALIASED_PLUGIN_IO_10_03="ALIASED_PLUGIN_IO_10_03"),
    ProfilingVerbosity=types.SimpleNamespace(DETAILED="DETAILED"),
)


@pytest.fixture(scope="module")
def registered() -> dict[str, Any]:
    registry: dict[str, Any] = {}
    qdp._register_one(FAKE_TRT, fake_trtp(registry), attention_inplace, 89, compile_kernel)
    return registry[qdp.plugin_id(attention_inplace.SPEC)]


def descs(batch: int = 2, s: int = 3, slots: int = 40) -> list[TensorDesc]:
    b, seq = Dim(batch, False), Dim(s, False)  # batch and sequence dynamic; heads, cache length, head dim static
    shapes = [(b, Dim(8), seq, Dim(256)), (b, Dim(4), seq, Dim(256)), (b, Dim(4), seq, Dim(256))]
    shapes += [(b, Dim(4), Dim(slots), Dim(256))] * 2
    return [TensorDesc(x, "float16") for x in shapes] + [TensorDesc((b, seq), "int64")]


def test_presents_are_declared_aliases_of_the_pasts(registered: dict[str, Any]) -> None:
    inputs = descs()
    outs = registered["register"](*inputs, **ATTRS)
    by_identity = {id(t): i for i, t in enumerate(inputs)}  # how tensorrt.plugin maps an alias to an input index
    aliases = {i: by_identity[id(o.get_aliased())] for i, o in enumerate(outs) if o.get_aliased() is not None}
    assert aliases == attention_inplace.ALIASES == {1: 3, 2: 4}
    assert [(o.shape_expr, o.dtype) for o in outs] == [(t.shape_expr, t.dtype) for t in (inputs[0], *inputs[3:5])]
    signature = inspect.signature(registered["register"])
    assert list(signature.parameters) == [
        *attention_inplace.SPEC.inputs,
        *(a.name for a in attention_inplace.SPEC.attrs),
    ]


def test_aot_impl_hands_over_the_in_place_kernel(registered: dict[str, Any], tmp_path: Path) -> None:
    inputs = descs(batch=3, s=5, slots=40)
    outs = registered["register"](*inputs, **ATTRS)
    values = [ATTRS[a.name] for a in attention_inplace.SPEC.attrs]
    name, ptx, launch, scalars = registered["aot_impl"](*inputs, *values, outs, 0)
    k = compile_kernel("SlidingWindowAttentionInplace", 89, "fp16", **ATTRS)
    shapes = [tuple(int(d) for d in t.shape_expr) for t in inputs]
    assert name == k.name.encode() == b"attention_inplace_kernel"
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == k.grid(shapes) == (1 + 1, 3 * 4, 1)  # S=5: one tile each
    assert (launch.block_x, launch.shared_mem) == (k.threads_per_block, k.shared_mem)
    assert scalars == (5, 40)  # S, C
    n_params = len(k.input_args) + len(k.scalar_args) + len(k.output_args)
    assert f"{k.name}_param_{n_params}" not in ptx.decode()  # Triton's hidden scratch pointers are gone
    (tmp_path / "k.ptx").write_bytes(ptx)
    assert (
        subprocess.run([str(PTXAS), "-arch=sm_89", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")]).returncode
        == 0
    )
    returns = inspect.signature(registered["aot_impl"]).return_annotation  # tensorrt.plugin refuses none
    assert returns == tuple[bytes, bytes, LaunchParams, SymIntExprs]


class RecordingConfig:
    builder_optimization_level = 3

    def __init__(self) -> None:
        self.features: list[tuple[str, bool]] = []

    def set_preview_feature(self, feature: str, enabled: bool) -> None:
        self.features.append((feature, enabled))


def test_builds_with_plugins_turn_on_plugin_io_aliasing() -> None:
    config = RecordingConfig()
    backend = types.SimpleNamespace(trt=FAKE_TRT, apply_targets=lambda config, sms: None, label="TensorRT")
    builder = types.SimpleNamespace(create_builder_config=lambda: config)
    _configure(backend, builder, (89,), [], BuildOptions("tensorrt", plugins=True), Path("m.onnx"), None)
    assert config.features == [("ALIASED_PLUGIN_IO_10_03", True)]
    plain = RecordingConfig()
    builder = types.SimpleNamespace(create_builder_config=lambda: plain)
    _configure(backend, builder, (89,), [], BuildOptions("tensorrt"), Path("m.onnx"), None)
    assert plain.features == []  # graphs without plugins build as before


def test_a_tensorrt_without_plugin_io_aliasing_is_a_one_line_error() -> None:
    old = types.SimpleNamespace(PreviewFeature=types.SimpleNamespace())
    with pytest.raises(qdp.PluginRegistrationError, match=r"no PreviewFeature\.ALIASED_PLUGIN_IO_10_03") as err:
        qdp.enable_aliased_plugin_io(old, RecordingConfig())
    assert "\n" not in str(err.value)

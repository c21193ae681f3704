"""The full-TensorRT plugin registration, as far as it runs without TensorRT: everything it derives from
g2trt's own code (signatures from the specs, shape/dtype rules, kernel parameters, the PTX and launch it
hands over), driven through a stand-in for `tensorrt.plugin` that records what would be registered.
TensorRT itself never runs here; docs/build.md says so."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import triton
from onnx import helper

from tests.deploy.build_graphs import attention_node, softcap_graph
from trt_plugins import PLUGINS, attention, sandwich_rmsnorm, softcap
from trt_plugins.aot import compile_kernel
from trt_plugins.kernels import KERNELS
from trt_plugins.kernels.common import int_cdiv
from trt_plugins.registration import tensorrt_qdp as qdp
from trt_plugins.registration.tensorrt_qdp import (
    STATIC_DIMS,
    PluginRegistrationError,
    canonical_plugin_model,
    kernel_arch,
    trim_ptx_params,
)

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def test_output_dtype_rules_match_the_references():
    """`output_dtypes` (used for TensorRT's output descriptors) agrees with what the references return."""
    h, r = torch.randn(2, 3, 8, dtype=torch.float16), torch.randn(2, 3, 8)
    outs = sandwich_rmsnorm.reference(h, r, torch.ones(8), torch.ones(8), epsilon=1e-6)
    assert [t.dtype for t in outs] == sandwich_rmsnorm.output_dtypes(h.dtype, r.dtype, torch.float32, torch.float32)
    x = torch.randn(2, 5, dtype=torch.bfloat16)
    assert [softcap.reference(x, cap=30.0).dtype] == softcap.output_dtypes(x.dtype)
    q, k = torch.randn(1, 4, 3, 8, dtype=torch.float16), torch.randn(1, 2, 3, 8, dtype=torch.float16)
    past = torch.zeros(1, 2, 0, 8, dtype=torch.float16)
    mask = torch.ones(1, 3, dtype=torch.int64)
    outs = attention.reference(q, k, k, past, past, mask, num_heads=4, kv_heads=2, head_dim=8, scale=0.3)
    assert [t.dtype for t in outs] == attention.output_dtypes(q.dtype, k.dtype)
    assert [tuple(t.shape) for t in outs] == attention.output_shapes(q.shape, k.shape, k.shape, past.shape)


def test_kernel_arch():
    assert [kernel_arch(sm) for sm in (80, 86, 89, 90, 100, 120)] == [80, 86, 89, 90, 89, 89]
    with pytest.raises(PluginRegistrationError, match="no Triton AOT target for SM 75"):
        kernel_arch(75)


def test_static_dims_cover_every_kernel_parameter():
    """Each kernel's required plan() parameters are spec attributes or a static dim registration supplies."""
    for name, module in KERNELS.items():
        spec = PLUGINS[name].SPEC
        params = inspect.signature(module.plan).parameters.values()
        required = {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
        assert required - {a.name for a in spec.attrs} == set(STATIC_DIMS[name]), name
        assert set(STATIC_DIMS[name].values()) <= set(spec.inputs)


def test_trim_refuses_to_drop_a_parameter_the_kernel_reads():
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n"
    ptx += "{\n\tld.param.u64 %rd1, [k_param_1];\n}"
    with pytest.raises(PluginRegistrationError, match="reads \\['k_param_1'\\]"):
        trim_ptx_params(ptx, "k", 1)
    assert trim_ptx_params(ptx, "k", 2).count("k_param_") == 3


# --- a stand-in for tensorrt.plugin: records registrations, evaluates shapes on ints -------------------


class Dim(int):
    """A static dim as TensorRT's ShapeExpr presents it."""

    is_constant = True

    def constant_value(self) -> int:
        return int(self)


class DynDim(int):
    """A dynamic dim (its value is only used for the int arithmetic of this stand-in)."""

    is_constant = False


class TensorDesc:
    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape_expr, self.dtype = shape, dtype


class LaunchParams:
    grid_x = grid_y = grid_z = block_x = shared_mem = 1


FAKE_TRT = types.SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16", int64="int64")


def fake_trtp(registry: dict[str, dict[str, Any]]) -> Any:
    def decorator(kind: str):
        return lambda pid: lambda fn: registry.setdefault(pid, {}).__setitem__(kind, fn) or fn

    return types.SimpleNamespace(
        TensorDesc=TensorDesc,
        ShapeExprs=type("ShapeExprs", (tuple,), {}),
        from_shape_expr=lambda shape, dtype: (tuple(shape), dtype),
        register=decorator("register"),
        aot_impl=decorator("aot_impl"),
        cdiv=int_cdiv,
        KernelLaunchParams=LaunchParams,
        SymInt32=int,
        SymIntExprs=types.SimpleNamespace(from_tuple=tuple),
    )


def check_signatures(spec: Any, fns: dict[str, Any]) -> None:
    """The schema tensorrt.plugin validates: TensorDesc inputs then typed attributes; aot adds outputs, tactic."""
    desc = inspect.signature(fns["register"])
    names = [*spec.inputs, *(a.name for a in spec.attrs)]
    assert list(desc.parameters) == names
    assert [p.annotation for p in desc.parameters.values()][: len(spec.inputs)] == [TensorDesc] * len(spec.inputs)
    assert [desc.parameters[a.name].annotation for a in spec.attrs] == [
        int if a.type == "int" else float for a in spec.attrs
    ]
    assert desc.return_annotation == tuple[(TensorDesc,) * len(spec.outputs)]
    assert list(inspect.signature(fns["aot_impl"]).parameters) == [*names, "outputs", "tactic"]


def assembles(ptx: bytes, arch: int, tmp_path: Path) -> bool:
    src = tmp_path / "k.ptx"
    src.write_bytes(ptx)
    proc = subprocess.run([str(PTXAS), f"-arch=sm_{arch}", str(src), "-o", str(tmp_path / "k.cubin")], check=False)
    return proc.returncode == 0


@pytest.mark.parametrize(
    ("module", "inputs", "attrs"),
    [
        (
            attention,
            [
                ((DynDim(2), Dim(4), DynDim(3), Dim(32)), "float16"),
                ((DynDim(2), Dim(2), DynDim(3), Dim(32)), "float16"),
                ((DynDim(2), Dim(2), DynDim(3), Dim(32)), "float16"),
                ((DynDim(2), Dim(2), DynDim(5), Dim(32)), "float16"),
                ((DynDim(2), Dim(2), DynDim(5), Dim(32)), "float16"),
                ((DynDim(2), DynDim(8)), "int64"),
            ],
            {"num_heads": 4, "kv_heads": 2, "head_dim": 32, "scale": 32**-0.5, "softcap": 50.0, "window": 16},
        ),
        (softcap, [((DynDim(2), DynDim(3), Dim(1024)), "float32")], {"cap": 30.0}),
        (
            sandwich_rmsnorm,
            [
                ((DynDim(2), DynDim(3), Dim(64)), "float16"),
                ((DynDim(2), DynDim(3), Dim(64)), "float32"),
                ((Dim(64),), "float32"),
                ((Dim(64),), "float32"),
            ],
            {"epsilon": 1e-6},
        ),
    ],
    ids=lambda v: getattr(v, "__name__", "").rsplit(".", 1)[-1] or None,
)
def test_registration_through_a_tensorrt_plugin_stand_in(module, inputs, attrs, tmp_path):
    registry: dict[str, dict[str, Any]] = {}
    qdp._register_one(FAKE_TRT, fake_trtp(registry), module, 89, compile_kernel)
    spec = module.SPEC
    fns = registry[f"g2trt::{spec.name}"]
    check_signatures(spec, fns)

    descs = [TensorDesc(shape, dtype) for shape, dtype in inputs]
    shapes = [tuple(int(d) for d in s) for s, _ in inputs]
    outs = fns["register"](*descs, **attrs)
    assert [s for s, _ in outs] == [tuple(s) for s in module.output_shapes(*shapes)]
    assert [d for _, d in outs] == module.output_dtypes(*(d for _, d in inputs))

    values = [attrs[a.name] for a in spec.attrs]
    name, ptx, launch, scalars = fns["aot_impl"](*descs, *values, tuple(outs), 0)
    dtypes = [{"float32": "fp32", "float16": "fp16", "int64": "i64"}[d] for _, d in inputs]
    dtype, params = qdp.kernel_params(spec, attrs, dtypes, [s[-1] for s in shapes])
    k = compile_kernel(spec.name, 89, dtype, **params)
    assert name == k.name.encode()
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == tuple(k.grid(shapes))
    assert (launch.block_x, launch.shared_mem) == (k.threads_per_block, k.shared_mem)
    assert scalars == tuple(k.scalars(shapes))
    n_params = len(k.input_args) + len(k.scalar_args) + len(k.output_args)
    assert ptx.decode().count(f"{k.name}_param_") >= n_params
    assert f"{k.name}_param_{n_params}" not in ptx.decode()  # Triton's hidden scratch pointers are gone
    assert assembles(ptx, 89, tmp_path), "the trimmed PTX must still assemble"


def test_canonical_model_puts_attributes_in_spec_order(tmp_path: Path):
    node = attention_node()
    assert [a.name for a in node.attribute] == sorted(a.name for a in node.attribute)  # how onnx.helper writes them
    graph = helper.make_graph([node], "g", [], [])
    onnx.save(helper.make_model(graph), tmp_path / "a.onnx")
    model = onnx.load_from_string(canonical_plugin_model(tmp_path / "a.onnx"))
    names = [a.name for a in model.graph.node[0].attribute]
    assert names == [*(a.name for a in attention.SPEC.attrs), "plugin_version", "plugin_namespace", "aot"]
    got = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert got["aot"] == 1 and np.isclose(got["scale"], 32**-0.5) and got["window"] == 16


def test_canonical_model_refuses_incomplete_nodes(tmp_path: Path):
    model = onnx.load(softcap_graph(tmp_path / "s.onnx"))
    del model.graph.node[0].attribute[:]
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(PluginRegistrationError, match="SoftCap node 'cap0' lacks attribute\\(s\\) \\['cap'\\]"):
        canonical_plugin_model(tmp_path / "bad.onnx")


def test_register_plugins_needs_the_full_tensorrt(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(PluginRegistrationError, match=r"tensorrt.plugin is not available .*TensorRT >= 10.15"):
        qdp.register_plugins(FAKE_TRT, 89)

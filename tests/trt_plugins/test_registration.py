"""The full-TensorRT plugin registration through TensorRT 11.4's own `tensorrt.plugin` (the pure-Python
layer of the `tensorrt-cu13-bindings` wheel: its decorators, validators and AOT plugin class), over a
stand-in for the compiled module (tests/trt_plugins/real_tensorrt_plugin.py): signatures, shape/dtype
rules, kernel parameters, the PTX and launch TensorRT would take. TensorRT's C++ builder never runs
here; docs/build.md says so."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import triton
from onnx import helper

from tests.deploy.build_graphs import attention_node, softcap_graph
from tests.trt_plugins.real_tensorrt_plugin import build_time_calls, native_stand_in, real_tensorrt_plugin
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


# --- the registration through TensorRT 11.4's own tensorrt.plugin (tests/trt_plugins/real_tensorrt_plugin.py) --


@pytest.fixture
def real_trtp(monkeypatch: pytest.MonkeyPatch):
    """(native stand-in, the wheel's tensorrt.plugin), with g2trt's registered-plugin memo emptied."""
    monkeypatch.setattr(qdp, "_REGISTERED", set())
    with real_tensorrt_plugin() as pair:
        yield pair


def assembles(ptx: bytes, arch: int, tmp_path: Path) -> bool:
    src = tmp_path / "k.ptx"
    src.write_bytes(ptx)
    proc = subprocess.run([str(PTXAS), f"-arch=sm_{arch}", str(src), "-o", str(tmp_path / "k.cubin")], check=False)
    return proc.returncode == 0


def test_every_plugin_registers_through_the_real_validators(real_trtp):
    trt, trtp = real_trtp
    ids = qdp.register_plugins(trt, 89)
    assert ids == [f"g2trt::{name}" for name in PLUGINS]
    for module in PLUGINS.values():  # what tensorrt.plugin parsed from g2trt's signatures
        spec = module.SPEC
        definition = trtp._lib.QDP_REGISTRY[qdp.plugin_id(spec)]
        assert definition.input_tensor_names == list(spec.inputs)
        assert definition.input_attrs == {a.name: int if a.type == "int" else float for a in spec.attrs}
        assert definition.num_outputs == len(spec.outputs)
        assert definition.aot_impl_attr_names == [a.name for a in spec.attrs]
    assert qdp.register_plugins(trt, 89) == ids  # idempotent: a second build in the process registers nothing


def test_the_real_validator_refuses_an_aot_impl_without_its_return_annotation(real_trtp, monkeypatch):
    """The bug this registration had: TensorRT 10.15-11.x refuse it, so every `g2trt build --plugins` failed."""
    trt, _ = real_trtp
    monkeypatch.setattr(qdp, "aot_returns", lambda trtp: inspect.Signature.empty)
    with pytest.raises(PluginRegistrationError, match="No return annotation found for aot_impl function"):
        qdp.register_plugins(trt, 89)


F16, F32, I64 = "HALF", "FLOAT", "INT64"


@pytest.mark.parametrize(
    ("module", "inputs", "attrs"),
    [
        (
            attention,
            [  # dims as (value, build-time constant): batch and sequence lengths are dynamic
                (((2, False), (4, True), (3, False), (32, True)), F16),
                (((2, False), (2, True), (3, False), (32, True)), F16),
                (((2, False), (2, True), (3, False), (32, True)), F16),
                (((2, False), (2, True), (5, False), (32, True)), F16),
                (((2, False), (2, True), (5, False), (32, True)), F16),
                (((2, False), (8, False)), I64),
            ],
            {"num_heads": 4, "kv_heads": 2, "head_dim": 32, "scale": 144**-0.5, "softcap": 50.0, "window": 16},
        ),
        (softcap, [(((2, False), (3, False), (1024, True)), F32)], {"cap": 30.0}),
        (
            sandwich_rmsnorm,
            [
                (((2, False), (3, False), (64, True)), F16),
                (((2, False), (3, False), (64, True)), F32),
                (((64, True),), F32),
                (((64, True),), F32),
            ],
            {"epsilon": 1e-6},
        ),
    ],
    ids=lambda v: getattr(v, "__name__", "").rsplit(".", 1)[-1] or None,
)
def test_tensorrts_build_time_calls_on_the_real_plugin_class(module, inputs, attrs, real_trtp, tmp_path):
    """What TensorRT's builder asks a tensorrt.plugin AOT plugin, answered by g2trt's describe/aot inside the
    real plugin class: output types and shapes, formats, the kernel, its PTX and its launch."""
    trt, _ = real_trtp
    qdp.register_plugins(trt, 89)
    spec = module.SPEC
    typed = [(dims, getattr(trt.DataType, t)) for dims, t in inputs]
    got = build_time_calls(trt, qdp.plugin_id(spec), typed, attrs)

    shapes = [tuple(v for v, _ in dims) for dims, _ in inputs]
    assert got["output_shapes"] == [tuple(s) for s in module.output_shapes(*shapes)]
    assert got["output_dtypes"] == module.output_dtypes(*(t for _, t in typed))
    assert all(f == trt.TensorFormat.LINEAR for _, f in got["formats"])  # no autotune: linear I/O
    names = {"FLOAT": "fp32", "HALF": "fp16", "INT64": "i64"}
    dtype, params = qdp.kernel_params(spec, attrs, [names[t] for _, t in inputs], [s[-1] for s in shapes])
    k = compile_kernel(spec.name, 89, dtype, **params)
    assert got["kernel"] == k.name.encode()
    assert got["grid"] == tuple(k.grid(shapes, int_cdiv))
    assert (got["block_x"], got["shared_mem"]) == (k.threads_per_block, k.shared_mem)
    assert got["scalars"] == tuple(k.scalars(shapes))
    ptx = got["ptx"].decode()
    n_params = len(k.input_args) + len(k.scalar_args) + len(k.output_args)
    assert ptx.count(f"{k.name}_param_") >= n_params
    assert f"{k.name}_param_{n_params}" not in ptx  # Triton's hidden scratch pointers are gone
    assert assembles(got["ptx"], 89, tmp_path), "the trimmed PTX must still assemble"


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
        qdp.register_plugins(native_stand_in(), 89)

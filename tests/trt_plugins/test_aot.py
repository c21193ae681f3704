"""The plugin kernels compile ahead of time, with no GPU, for sm_80, sm_86, sm_89 and sm_90, and a kernel that
does not compile or does not fit a target fails the build with an error naming the kernel and the arch."""

from __future__ import annotations

import re
import struct

import pytest

from export.config import preset
from export.errors import G2trtError
from trt_plugins import PLUGINS
from trt_plugins.aot import (
    ARCHS,
    DEFAULT_SHARED,
    HIDDEN_ARGS,
    CompiledKernel,
    KernelCompileError,
    KernelRequest,
    compile_all,
    compile_kernel,
    default_requests,
    model_requests,
)

EM_CUDA = 190
PTX_TARGET = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90a"}
ATTN_2B = {"num_heads": 8, "kv_heads": 4, "head_dim": 256, "scale": 256**-0.5, "softcap": 50.0}
ATTN_27B = {"num_heads": 32, "kv_heads": 16, "head_dim": 128, "scale": 144**-0.5, "softcap": 50.0}
FP16_NORM = {"residual": "fp32", "post_scale": "fp32", "pre_scale": "fp32"}
# Every plugin in every dtype, both attention head dims Gemma 2 uses, sliding and global, and an odd head dim.
REQUESTS = [
    KernelRequest("SoftCap", "fp32", {"cap": 30.0, "n_cols": 256000}),
    KernelRequest("SoftCap", "fp16", {"cap": 50.0, "n_cols": 1000}),
    KernelRequest("SoftCap", "bf16", {"cap": 30.0, "n_cols": 7}),
    KernelRequest("SandwichRMSNorm", "fp32", {"epsilon": 1e-6, "hidden": 3584}),
    KernelRequest("SandwichRMSNorm", "fp16", {"epsilon": 1e-6, "hidden": 2304, "tensor_dtypes": FP16_NORM}),
    KernelRequest(
        "SandwichRMSNorm", "bf16", {"epsilon": 1e-6, "hidden": 4608, "tensor_dtypes": {"post_scale": "fp32"}}
    ),
    KernelRequest("SlidingWindowAttention", "fp32", {**ATTN_2B, "window": 0}),
    KernelRequest("SlidingWindowAttention", "fp16", {**ATTN_2B, "window": 4096}),
    KernelRequest("SlidingWindowAttention", "bf16", {**ATTN_27B, "window": 4096}),
    KernelRequest("SlidingWindowAttention", "fp16", {**ATTN_27B, "window": 0}),
    KernelRequest("SlidingWindowAttention", "bf16", {**ATTN_2B, "head_dim": 80, "softcap": 0.0, "window": 16}),
    KernelRequest("SlidingWindowAttentionInplace", "fp32", {**ATTN_2B, "window": 0}),
    KernelRequest("SlidingWindowAttentionInplace", "fp16", {**ATTN_2B, "window": 4096}),
    KernelRequest("SlidingWindowAttentionInplace", "bf16", {**ATTN_27B, "window": 4096}),
    KernelRequest("SlidingWindowAttentionInplace", "fp16", {**ATTN_27B, "head_dim": 80, "window": 0}),
]


@pytest.fixture(scope="module")
def compiled() -> list[CompiledKernel]:
    return compile_all(ARCHS, REQUESTS)


def entry_params(ptx: str, name: str) -> list[str]:
    m = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    assert m, f"no .entry {name} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def test_every_request_compiles_for_every_arch(compiled: list[CompiledKernel]) -> None:
    assert [(k.arch, k.plugin, k.dtype) for k in compiled] == [(a, r.plugin, r.dtype) for a in ARCHS for r in REQUESTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_cubin_and_ptx_are_for_the_target(compiled: list[CompiledKernel], arch: int) -> None:
    for k in (k for k in compiled if k.arch == arch):
        assert k.cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", k.cubin, 18)[0] == EM_CUDA, k.plugin
        assert k.name.encode() in k.cubin
        assert k.ptx_target == PTX_TARGET[arch]
        assert re.search(r"^\.version 8\.0$", k.ptx, re.M), "PTX ISA 8.0, which CUDA 12.0+ drivers JIT-compile"
        assert 0 <= k.shared_mem <= DEFAULT_SHARED and k.threads_per_block == 32 * k.num_warps


def test_kernel_parameters_follow_the_plugin_calling_convention(compiled: list[CompiledKernel]) -> None:
    """inputs (spec order), int32 scalars, outputs (spec order), then Triton's hidden scratch pointers."""
    for k in compiled:
        spec = PLUGINS[k.plugin].SPEC
        assert len(k.input_args) == len(spec.inputs) and len(k.output_args) == len(spec.outputs)
        runtime = [n for n, t in k.signature.items() if t != "constexpr"]
        assert runtime == [*k.input_args, *k.scalar_args, *k.output_args]
        assert all(k.signature[n] == "i32" for n in k.scalar_args)
        params = entry_params(k.ptx, k.name)
        assert len(params) == len(runtime) + len(HIDDEN_ARGS)
        expect = ["u64"] * len(k.input_args) + ["u32"] * len(k.scalar_args) + ["u64"] * len(k.output_args)
        assert params == [*expect, "u64", "u64"], k.plugin


def test_dtypes_reach_the_signature(compiled: list[CompiledKernel]) -> None:
    norm = next(k for k in compiled if k.plugin == "SandwichRMSNorm" and k.dtype == "fp16")
    assert [norm.signature[n] for n in (*norm.input_args, *norm.output_args)] == [
        "*fp16", "*fp32", "*fp32", "*fp32", "*fp32", "*fp16"
    ]  # fmt: skip
    attn = next(k for k in compiled if k.plugin == "SlidingWindowAttention" and k.dtype == "bf16")
    assert attn.signature["mask_ptr"] == "*i64" and attn.signature["out_ptr"] == "*bf16"
    assert attn.constexprs["BLOCK_D"] == 128 and attn.constexprs["WINDOW"] == 4096
    inplace = next(k for k in compiled if k.plugin == "SlidingWindowAttentionInplace" and k.dtype == "bf16")
    assert [inplace.signature[n] for n in (*inplace.input_args, *inplace.output_args)] == [
        "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*i64", "*bf16", "*bf16", "*bf16"
    ]  # fmt: skip
    assert inplace.scalar_args == ("S", "C") and inplace.constexprs["WINDOW"] == 4096


class Sym:
    """A stand-in for TensorRT's symbolic shape expressions: records the arithmetic it takes part in."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _op(self, other: object, op: str, swap: bool = False) -> Sym:
        o = other.text if isinstance(other, Sym) else str(other)
        return Sym(f"({o} {op} {self.text})" if swap else f"({self.text} {op} {o})")

    def __add__(self, other: object) -> Sym:
        return self._op(other, "+")

    def __mul__(self, other: object) -> Sym:
        return self._op(other, "*")

    def __rmul__(self, other: object) -> Sym:
        return self._op(other, "*", swap=True)


def sym_cdiv(a: Sym, b: int) -> Sym:
    return Sym(f"cdiv({a.text}, {b})")


def test_grid_and_scalars_are_symbolic_in_the_input_shapes(compiled: list[CompiledKernel]) -> None:
    attn = next(k for k in compiled if k.plugin == "SlidingWindowAttention" and k.dtype == "fp16")
    q, kv, past, mask = (["B", "H", "S", "D"], ["B", "KV", "S", "D"], ["B", "KV", "P", "D"], ["B", "M"])
    shapes = [[Sym(d) for d in s] for s in (q, kv, kv, past, past, mask)]
    bm, cm = attn.constexprs["BLOCK_M"], attn.constexprs["COPY_M"]
    gx, gy, gz = attn.grid(shapes, sym_cdiv)
    assert (gx.text, gy.text, gz) == (f"(cdiv((S * 2), {bm}) + cdiv((P + S), {cm}))", "(B * 4)", 1)
    assert [s.text for s in attn.scalars(shapes)] == ["S", "P", "M"]
    assert attn.grid([[2, 8, 5, 256], [2, 4, 5, 256], [2, 4, 5, 256], [2, 4, 7, 256], [2, 4, 7, 256], [2, 12]]) == (
        -(-10 // bm) + -(-12 // cm),
        8,
        1,
    )
    inplace = next(k for k in compiled if k.plugin == "SlidingWindowAttentionInplace" and k.dtype == "fp16")
    cache, pos = ["B", "KV", "C", "D"], ["B", "S"]
    shapes = [[Sym(d) for d in s] for s in (q, kv, kv, cache, cache, pos)]
    bm, cm = inplace.constexprs["BLOCK_M"], inplace.constexprs["COPY_M"]
    gx, gy, gz = inplace.grid(shapes, sym_cdiv)  # no cache-length term: decode launches no per-slot programs
    assert (gx.text, gy.text, gz) == (f"(cdiv((S * 2), {bm}) + cdiv(S, {cm}))", "(B * 4)", 1)
    assert [s.text for s in inplace.scalars(shapes)] == ["S", "C"]
    norm = next(k for k in compiled if k.plugin == "SandwichRMSNorm")
    x = [Sym("B"), Sym("S"), 2304]
    assert norm.grid([x, x, [2304], [2304]], sym_cdiv)[0].text == "(B * S)" and norm.scalars([x]) == ()


def test_model_requests_cover_a_gemma_export() -> None:
    reqs = model_requests(preset("2b"), "fp16")
    assert [r.plugin for r in reqs] == [
        "SoftCap",
        "SandwichRMSNorm",
        "SlidingWindowAttention",
        "SlidingWindowAttention",
        "SlidingWindowAttentionInplace",  # both KV-cache contracts by default
        "SlidingWindowAttentionInplace",
    ]
    assert reqs[0].dtype == "fp32" and reqs[0].params["n_cols"] == 256000  # logits are fp32 in every export
    assert reqs[1].params["tensor_dtypes"]["residual"] == "fp32"  # fp16 exports keep an fp32 residual stream
    assert [r.params["window"] for r in reqs[2:]] == [0, 4096, 0, 4096]
    inplace = model_requests(preset("2b"), "fp16", kv_caches=("inplace",))
    assert [r.plugin for r in inplace[2:]] == ["SlidingWindowAttentionInplace"] * 2
    assert len(default_requests()) == len({r.describe() for r in default_requests()})


def test_a_kernel_that_does_not_compile_names_kernel_and_arch() -> None:
    bad = KernelRequest("SlidingWindowAttention", "fp16", {**ATTN_2B, "window": 8, "num_warps": 3})
    with pytest.raises(KernelCompileError, match=r"SlidingWindowAttention\[fp16\].*num_warps=3.* for sm_86: "):
        compile_all([86], [REQUESTS[0], bad])


def test_a_kernel_over_the_shared_memory_limit_fails_loudly() -> None:
    with pytest.raises(KernelCompileError, match=r"SlidingWindowAttention\[fp32\].* for sm_89: needs \d+ bytes"):
        compile_kernel("SlidingWindowAttention", 89, "fp32", shared_limit=4096, **ATTN_27B)


@pytest.mark.parametrize(
    ("args", "params", "message"),
    [
        (("SoftCap", 75, "fp32"), {"cap": 30.0, "n_cols": 8}, "unsupported arch sm_75"),
        (("SoftCap", 90, "fp32"), {"cap": 30.0, "n_cols": 8, "ptx_version": 78}, "sm_90 needs PTX ISA >= 80"),
        (("Nope", 80, "fp32"), {}, "no kernel for plugin 'Nope'"),
        (("SoftCap", 80, "fp32"), {"cap": 30.0}, "bad kernel parameters"),
        (("SoftCap", 80, "fp8"), {"cap": 30.0, "n_cols": 8}, "unsupported dtype 'fp8'"),
        (("SandwichRMSNorm", 80, "fp16"), {"epsilon": 1e-6}, "bad kernel parameters"),
        (("SandwichRMSNorm", 80, "fp16"), {"epsilon": 1e-6, "hidden": 32768}, "hidden size 32768"),
        (("SlidingWindowAttention", 80, "fp16"), {**ATTN_2B, "num_heads": 6}, "multiple of kv_heads"),
        (("SlidingWindowAttention", 80, "fp16"), {**ATTN_2B, "head_dim": 512}, "head_dim 512"),
        (("SlidingWindowAttention", 80, "fp16"), {**ATTN_2B, "block_m": 24}, "powers of two"),
        (
            ("SlidingWindowAttention", 80, "fp16"),
            {**ATTN_2B, "tensor_dtypes": {"key": "fp32"}},
            "must share one dtype",
        ),
        (
            ("SlidingWindowAttention", 80, "fp16"),
            {**ATTN_2B, "tensor_dtypes": {"attention_mask": "fp16"}},
            "input 'attention_mask': dtype 'fp16' not supported",
        ),
        (
            ("SlidingWindowAttentionInplace", 80, "fp16"),
            {**ATTN_2B, "tensor_dtypes": {"position_ids": "fp16"}},
            "input 'position_ids': dtype 'fp16' not supported",
        ),
        (
            ("SlidingWindowAttentionInplace", 80, "fp16"),
            {**ATTN_2B, "tensor_dtypes": {"past_key": "fp32"}},
            "must share one dtype",
        ),
        (("SlidingWindowAttentionInplace", 80, "fp16"), {**ATTN_2B, "kv_heads": 3}, "multiple of kv_heads"),
    ],
)
def test_bad_requests_are_one_line_errors(args: tuple, params: dict, message: str) -> None:
    with pytest.raises(G2trtError, match=re.escape(message)) as err:
        compile_kernel(*args, **params)
    assert "\n" not in str(err.value)


def test_write_kernels_and_cli(compiled: list[CompiledKernel], tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from deploy.cli import cli
    from trt_plugins.aot import write_kernels

    out = write_kernels([k for k in compiled if k.arch == 89], tmp_path / "k")
    index = json.loads((out / "kernels.json").read_text())
    assert len(index) == len(REQUESTS) and all((out / e["cubin"]).read_bytes()[:4] == b"\x7fELF" for e in index)
    assert all(PTX_TARGET[89] in (out / e["ptx"]).read_text() for e in index)
    assert index[0]["params"][-2:] == list(HIDDEN_ARGS)

    run = CliRunner().invoke(cli, ["kernels", "--out", str(tmp_path / "cli"), "--preset", "tiny", "--sm", "86"])
    assert run.exit_code == 0, run.output
    plugins = sorted(e["plugin"] for e in json.loads((tmp_path / "cli" / "kernels.json").read_text()))
    assert plugins == [
        "SandwichRMSNorm",
        *["SlidingWindowAttention"] * 2,
        *["SlidingWindowAttentionInplace"] * 2,  # sliding and global, for the in-place contract
        "SoftCap",
    ]

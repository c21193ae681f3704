"""Ahead-of-time compile of the plugin kernels to cubin + PTX for a chosen GPU, on a machine with no GPU.

`compile_kernel("SlidingWindowAttention", 89, "fp16", num_heads=8, ...)` specializes the plugin's Triton
kernel for one plugin node (its attributes and static sizes become compile-time constants) and compiles it
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. The result, a `CompiledKernel`,
is what a TensorRT AOT plugin (`tensorrt.plugin.aot_impl`) returns: kernel name, PTX/cubin, launch grid and
block, shared memory, and the int32 extra arguments, each a function of the plugin's input shapes.

`compile_all` compiles a set of plugin instances for every target and fails with one `G2trtError` naming
the kernel and the arch when any of them does not compile or does not fit the target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from export.atomic import atomic_dir
from export.config import SLIDING, Gemma2Config, preset
from export.errors import G2trtError
from export.io_contract import KV_CACHES, KvCache
from trt_plugins.kernels.common import Cdiv, KernelPlan, int_cdiv

ARCHS = (80, 86, 89, 90)
# Largest dynamic shared memory one block may opt into, by compute capability (CUDA programming guide).
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# Oldest PTX ISA (x10) each target accepts; LLVM aborts the process below it, so it is checked first.
MIN_PTX = {80: 70, 86: 71, 87: 74, 89: 78, 90: 80}
# PTX ISA 8.0 (CUDA 12.0): the driver JIT-compiles PTX only up to its own CUDA version, and Triton's default
# is the newest its bundled ptxas knows (8.8 for sm_8x, 9.x for sm_90), which older drivers reject.
DEFAULT_PTX = 80
# Shared memory a launch gets without cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
DEFAULT_SHARED = 49152
# Triton appends these pointer parameters after the kernel's own; with zero scratch sizes the kernel never
# reads them, but a launcher must still pass one (null) pointer for each.
HIDDEN_ARGS = ("global_scratch", "profile_scratch")
# The attention plugin of each KV-cache contract (export/io_contract.py).
ATTENTION_PLUGINS: dict[KvCache, str] = {
    "dynamic": "SlidingWindowAttention",
    "inplace": "SlidingWindowAttentionInplace",
}


class KernelCompileError(G2trtError):
    """A plugin kernel did not compile, or does not fit, for a target."""


@dataclasses.dataclass(frozen=True)
class KernelRequest:
    """One plugin instance to compile: plugin name, dtype and the `plan` parameters of its kernel module."""

    plugin: str
    dtype: str
    params: Mapping[str, Any]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.plugin}[{self.dtype}]({args})"


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One kernel, compiled for one GPU architecture.

    Kernel parameters, in order: `input_args` (pointers to the plugin's inputs, in spec order), `scalar_args`
    (int32, from `scalars(shapes)`), `output_args` (pointers to the plugin's outputs, in spec order), then the
    `hidden_args` Triton appends (pass null pointers). Launch with `grid(shapes)` blocks of
    `threads_per_block` threads and `shared_mem` bytes of dynamic shared memory (above 48 KiB the launcher must
    raise the function's max dynamic shared memory attribute first). `shapes` are the plugin's input shapes
    in spec order: ints, or TensorRT shape expressions when `cdiv` is given as, e.g., `tensorrt.plugin.cdiv`.
    """

    plugin: str
    arch: int
    dtype: str
    name: str  # the kernel's symbol in `ptx` and `cubin`
    cubin: bytes
    ptx: str
    num_warps: int
    num_stages: int
    shared_mem: int
    constexprs: Mapping[str, int | float]
    signature: Mapping[str, str]
    input_args: tuple[str, ...]
    scalar_args: tuple[str, ...]
    output_args: tuple[str, ...]
    assume_aligned: bool  # pointers were compiled as 16-byte aligned
    ptx_version: int  # PTX ISA x10 of `ptx` (the driver that JIT-compiles it must support it)
    plan: KernelPlan = dataclasses.field(repr=False, compare=False)
    hidden_args: tuple[str, ...] = HIDDEN_ARGS

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32

    @property
    def ptx_target(self) -> str:
        """The PTX `.target` (sm_90 compiles to sm_90a, which runs on sm_90 GPUs only)."""
        m = re.search(r"^\s*\.target\s+(\S+)", self.ptx, re.MULTILINE)
        return m.group(1).rstrip(",") if m else ""

    def grid(self, shapes: Sequence[Sequence[Any]], cdiv: Cdiv = int_cdiv) -> tuple[Any, Any, Any]:
        return self.plan.grid(shapes, cdiv)

    def scalars(self, shapes: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        return self.plan.scalars(shapes)


def _modules() -> dict[str, Any]:
    from trt_plugins.kernels import KERNELS

    return KERNELS


def make_plan(plugin: str, dtype: str, params: Mapping[str, Any]) -> KernelPlan:
    """The kernel module's `plan(dtype, **params)`, with bad plugin names and parameters as G2trtErrors."""
    modules = _modules()
    if plugin not in modules:
        raise G2trtError(f"no kernel for plugin {plugin!r} (kernels: {', '.join(sorted(modules))})")
    try:
        return modules[plugin].plan(dtype, **params)
    except TypeError as e:  # unknown or missing keyword
        raise G2trtError(f"plugin {plugin}: bad kernel parameters {dict(params)}: {e}") from None


def compile_kernel(
    plugin_name: str,
    arch: int,
    dtype: str,
    *,
    assume_aligned: bool = True,
    shared_limit: int = DEFAULT_SHARED,
    ptx_version: int = DEFAULT_PTX,
    **params: Any,
) -> CompiledKernel:
    """Compile the kernel of `plugin_name` for compute capability `arch` (80, 86, 89, 90).

    `params` are the kernel module's `plan` parameters: the plugin attributes, the static sizes it needs
    (`n_cols` for SoftCap, `hidden` for SandwichRMSNorm), optional `tensor_dtypes` overrides and block sizes.
    `assume_aligned` compiles the pointers as 16-byte aligned (vectorized loads); a launcher must then pass
    16-byte aligned buffers. `shared_limit`: most shared memory the kernel may use; the default 48 KiB needs
    no opt-in at launch, more needs the launcher to raise the function attribute (up to the arch's maximum).
    `ptx_version`: PTX ISA x10 to emit (80 = PTX 8.0, which any CUDA 12+ driver can JIT-compile).
    """
    request = KernelRequest(plugin_name, dtype, params)
    if arch not in MAX_SHARED:
        raise KernelCompileError(f"{request.describe()}: unsupported arch sm_{arch} (supported: {ARCHS})")
    if ptx_version < MIN_PTX[arch]:
        raise KernelCompileError(f"{request.describe()}: sm_{arch} needs PTX ISA >= {MIN_PTX[arch]}, got {ptx_version}")
    kernel_plan = make_plan(plugin_name, dtype, params)
    limit = min(shared_limit, MAX_SHARED[arch])
    return _compile(kernel_plan, request, int(arch), assume_aligned, limit, int(ptx_version))


def _compile(
    kernel_plan: KernelPlan, request: KernelRequest, arch: int, assume_aligned: bool, shared_limit: int, ptx: int
) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_plan.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise KernelCompileError(
            f"{request.describe()}: kernels were imported under TRITON_INTERPRET=1 and cannot be compiled; "
            "unset it to compile ahead of time"
        )
    signature = kernel_plan.signature()
    names = list(fn.arg_names)
    pointers = [n for n in names if signature[n].startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers} if assume_aligned else {}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(kernel_plan.constexprs), attrs=attrs)
    options = {
        "num_warps": kernel_plan.num_warps,
        "num_stages": kernel_plan.num_stages,
        "enable_fp_fusion": True,  # FMA contraction, Triton's default (stated: 3.10 flips the default)
        "ptx_version": ptx,
    }
    where = f"{request.describe()} for sm_{arch}"
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # Triton raises CompilationError, RuntimeError (ptxas), ...: all mean "does not compile"
        first = str(e).strip().splitlines()
        raise KernelCompileError(f"{where}: {type(e).__name__}: {first[0] if first else ''}") from e
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise KernelCompileError(f"{where}: needs global scratch memory, which plugin launches do not provide")
    if meta.shared > shared_limit:
        raise KernelCompileError(
            f"{where}: needs {meta.shared} bytes of shared memory, the limit is {shared_limit} "
            f"(sm_{arch} allows at most {MAX_SHARED[arch]}); use smaller blocks"
        )
    cubin = compiled.asm["cubin"]
    if cubin[:4] != b"\x7fELF":
        raise KernelCompileError(f"{where}: ptxas produced no cubin")
    return CompiledKernel(
        plugin=kernel_plan.plugin,
        arch=arch,
        dtype=request.dtype,
        name=meta.name,
        cubin=bytes(cubin),
        ptx=compiled.asm["ptx"],
        num_warps=meta.num_warps,
        num_stages=meta.num_stages,
        shared_mem=int(meta.shared),
        constexprs=dict(kernel_plan.constexprs),
        signature=signature,
        input_args=kernel_plan.input_args,
        scalar_args=kernel_plan.scalar_args,
        output_args=kernel_plan.output_args,
        assume_aligned=assume_aligned,
        ptx_version=ptx,
        plan=kernel_plan,
    )


def model_requests(cfg: Gemma2Config, dtype: str, kv_caches: Iterable[KvCache] = KV_CACHES) -> list[KernelRequest]:
    """The plugin instances a Gemma 2 export of `dtype` uses, with the dtypes `export/model.py` gives them:
    fp32 logits into SoftCap; fp32 norm scales, and a fp32 residual stream under fp16 weights. Attention for
    each KV-cache contract in `kv_caches` (default both: SlidingWindowAttention for `dynamic`,
    SlidingWindowAttentionInplace for `inplace`)."""
    reqs = []
    if cfg.final_logit_softcapping:
        reqs.append(KernelRequest("SoftCap", "fp32", {"cap": cfg.final_logit_softcapping, "n_cols": cfg.vocab_size}))
    residual = "fp32" if dtype == "fp16" else dtype
    norm = {"epsilon": cfg.rms_norm_eps, "hidden": cfg.hidden_size}
    norm_dtypes = {"residual": residual, "post_scale": "fp32", "pre_scale": "fp32"}
    reqs.append(KernelRequest("SandwichRMSNorm", dtype, {**norm, "tensor_dtypes": norm_dtypes}))
    attn = {
        "num_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "scale": cfg.query_pre_attn_scalar**-0.5,
        "softcap": cfg.attn_logit_softcapping or 0.0,
    }
    windows = sorted({cfg.sliding_window if t == SLIDING else 0 for t in cfg.layer_types})
    for kv_cache in kv_caches:
        plugin = ATTENTION_PLUGINS[kv_cache]
        reqs += [KernelRequest(plugin, dtype, {**attn, "window": w}) for w in windows]
    return reqs


def default_requests() -> list[KernelRequest]:
    """Every distinct kernel Gemma 2 2b, 9b and 27b need, in fp32, fp16 and bf16 (head dims 256 and 128), for
    both KV-cache contracts."""
    seen: dict[str, KernelRequest] = {}
    for name in ("2b", "9b", "27b"):
        for dtype in ("fp32", "fp16", "bf16"):
            for r in model_requests(preset(name), dtype):
                seen.setdefault(repr((r.plugin, r.dtype, sorted(r.params.items(), key=str))), r)
    return list(seen.values())


def compile_all(
    archs: Iterable[int] = ARCHS,
    requests: Iterable[KernelRequest] | None = None,
    *,
    assume_aligned: bool = True,
    shared_limit: int = DEFAULT_SHARED,
    ptx_version: int = DEFAULT_PTX,
) -> list[CompiledKernel]:
    """Compile every request for every arch; the first failure raises a KernelCompileError naming both.

    Compiled kernels land in Triton's cache (`TRITON_CACHE_DIR`, default ~/.triton/cache), so a second run
    with the same kernels only re-reads them.
    """
    out = []
    reqs = list(requests) if requests is not None else default_requests()
    for arch in archs:
        for r in reqs:
            kw = {
                "assume_aligned": assume_aligned,
                "shared_limit": shared_limit,
                "ptx_version": ptx_version,
                **r.params,
            }
            out.append(compile_kernel(r.plugin, arch, r.dtype, **kw))
    return out


def describe(kernel: CompiledKernel) -> dict[str, Any]:
    """The launch facts of a compiled kernel as JSON-ready data (what a C++ launcher needs besides the binary)."""
    return {
        "plugin": kernel.plugin,
        "arch": kernel.arch,
        "dtype": kernel.dtype,
        "name": kernel.name,
        "ptx_target": kernel.ptx_target,
        "ptx_version": kernel.ptx_version,
        "num_warps": kernel.num_warps,
        "threads_per_block": kernel.threads_per_block,
        "shared_mem": kernel.shared_mem,
        "assume_aligned": kernel.assume_aligned,
        "params": [*kernel.input_args, *kernel.scalar_args, *kernel.output_args, *kernel.hidden_args],
        "signature": dict(kernel.signature),
        "constexprs": dict(kernel.constexprs),
    }


def write_kernels(kernels: Iterable[CompiledKernel], out: str | Path) -> Path:
    """Write each kernel's cubin and PTX, and `kernels.json` describing them, into `out` (atomically)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        index = []
        for k in kernels:
            facts = describe(k)
            key = json.dumps([facts["signature"], facts["constexprs"], k.num_stages], sort_keys=True)
            stem = f"{k.plugin}.{k.dtype}.{hashlib.sha256(key.encode()).hexdigest()[:10]}.sm_{k.arch}"
            (tmp / f"{stem}.cubin").write_bytes(k.cubin)
            (tmp / f"{stem}.ptx").write_text(k.ptx)
            index.append({**facts, "cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx"})
        (tmp / "kernels.json").write_text(json.dumps(index, indent=1) + "\n")
    return out

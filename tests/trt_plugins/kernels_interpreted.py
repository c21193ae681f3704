"""Parity of every plugin kernel with its PyTorch reference, run on CPU by Triton's interpreter.

Not collected on its own (no `test_` prefix): `test_kernels.py` runs this file in a pytest subprocess with
TRITON_INTERPRET=1, because Triton decides at import time whether `@triton.jit` builds interpreted or
compilable kernels, and the ahead-of-time tests in the same pytest process need compilable ones.

Tolerances (`assert_close`: |got - ref| <= atol + rtol * |ref|), by output dtype, on O(1) data:
* fp32 (1e-5, 1e-5) for SoftCap / SandwichRMSNorm: a few fp32 ulps from a different summation order and
  the exp2-based tanh. Attention fp32 (3e-5, 3e-5): scores q·k of size ~10 summed over up to 128 dims in
  another order differ by ~1e-6, and the softmax turns that into a relative error of the weights.
* fp16 (1e-3, 1e-3) for elementwise/norm outputs: one fp16 ulp (2^-10 relative) from rounding the same fp32
  value after a different fp32 path.
* Attention fp16 is checked twice. Against the reference run in fp32 on the same fp16 values, then rounded
  (2e-3, 2e-3): the kernel rounds the softmax weights to fp16 for P·V (2^-11 each) and the output once.
  Against the fp16 reference (5e-3, 5e-3): that one also rounds q·kᵀ to fp16 before scaling, an error of up
  to 2^-11 of scores of size ~30, which the softmax turns into output differences of a few 1e-3.
Measured on 150 random attention cases, the worst error is a third of these bounds.
* bf16 (8e-3, 8e-3): one bf16 ulp (2^-7 relative).
bf16 attention output is not checked here: the interpreter's `tl.dot` multiplies bf16 tensors as their raw
uint16 bits (numpy has no bf16), so only the bf16 KV-cache append is checked; bf16 attention is covered by
the ahead-of-time compile for every target (tests/trt_plugins/test_aot.py) and awaits a GPU run.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import kv_cache
from export.errors import G2trtError
from export.model import attention_bias
from trt_plugins import attention, attention_inplace, sandwich_rmsnorm, softcap
from trt_plugins.aot import KernelCompileError, compile_kernel
from trt_plugins.kernels import attention as attention_kernel
from trt_plugins.kernels import attention_inplace as attention_inplace_kernel
from trt_plugins.kernels import sandwich_rmsnorm as rmsnorm_kernel
from trt_plugins.kernels import softcap as softcap_kernel

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guards a direct run without the env var
    raise RuntimeError("run through tests/trt_plugins/test_kernels.py (needs TRITON_INTERPRET=1 at import)")

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": (1e-5, 1e-5), "fp16": (1e-3, 1e-3), "bf16": (8e-3, 8e-3)}
ATTN_TOL = {"fp32": (3e-5, 3e-5), "fp16": (2e-3, 2e-3)}
ATTN_TOL_SAME_DTYPE_REFERENCE = (5e-3, 5e-3)
FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def close(got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    torch.testing.assert_close(got.float(), ref.float(), atol=tol[0], rtol=tol[1], msg=lambda m: f"{what}: {m}")


# ---- SoftCap ----


@FAST
@given(
    dtype=st.sampled_from(["fp32", "fp16", "bf16"]),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple),
    n_cols=st.sampled_from([1, 7, 100, 1000, 2049, 5000]),
    cap=st.sampled_from([30.0, 50.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_softcap_matches_reference(dtype: str, shape: tuple, n_cols: int, cap: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # from far below the cap (near-identity) to far above it (saturated)
    x = (torch.randn((*shape, n_cols), generator=g) * torch.logspace(-3, 1, n_cols) * cap).to(DT[dtype])
    close(softcap_kernel.launch(x, cap=cap), softcap.reference(x, cap=cap), TOL[dtype], f"SoftCap {dtype}")


def test_softcap_tiny_values_keep_relative_precision() -> None:
    """Near 0, cap * tanh(x / cap) ~ x: the kernel's Taylor branch keeps the relative error at fp32 level."""
    x = torch.logspace(-30, -1, 500) * torch.tensor([1.0, -1.0]).repeat(250)
    got, ref = softcap_kernel.launch(x, cap=50.0), softcap.reference(x, cap=50.0)
    torch.testing.assert_close(got, ref, atol=0.0, rtol=1e-6)


# ---- SandwichRMSNorm ----

NORM_DTYPES = [  # (x, residual, scales): fp32; the fp16 export (fp32 residual and scales); bf16; all fp16
    ("fp32", "fp32", "fp32"),
    ("fp16", "fp32", "fp32"),
    ("bf16", "bf16", "fp32"),
    ("fp16", "fp16", "fp16"),
]


@FAST
@given(
    dtypes=st.sampled_from(NORM_DTYPES),
    rows=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    hidden=st.sampled_from([1, 5, 40, 96, 300, 2304]),
    residual_scale=st.sampled_from([1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_sandwich_rmsnorm_matches_reference(
    dtypes: tuple[str, str, str], rows: tuple, hidden: int, residual_scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    xd, rd, sd = (DT[d] for d in dtypes)
    x = torch.randn((*rows, hidden), generator=g).to(xd)
    res = (torch.randn((*rows, hidden), generator=g) * residual_scale).to(rd)
    post = (1 + 0.3 * torch.randn(hidden, generator=g)).to(sd)
    pre = (1 + 0.3 * torch.randn(hidden, generator=g)).to(sd)
    got = rmsnorm_kernel.launch(x, res, post, pre, epsilon=1e-6)
    ref = sandwich_rmsnorm.reference(x, res, post, pre, epsilon=1e-6)
    close(got[0], ref[0], TOL[dtypes[1]], f"SandwichRMSNorm residual_out {dtypes}")
    close(got[1], ref[1], TOL[dtypes[0]], f"SandwichRMSNorm normed {dtypes}")


# ---- SlidingWindowAttention ----


def attention_inputs(
    b: int, h: int, kv: int, s: int, p: int, hd: int, dtype: str, pad: int, extra_cols: int, seed: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    dt = DT[dtype]
    q, k, v = (torch.randn(b, n, s, hd, generator=g).to(dt) for n in (h, kv, kv))
    pk, pv = (torch.randn(b, kv, p, hd, generator=g).to(dt) for _ in range(2))
    mask = torch.ones(b, extra_cols + p + s, dtype=torch.int64)
    mask[-1, : extra_cols + pad] = 0  # the last row is left-padded (and has columns before this layer's keys)
    return q, k, v, pk, pv, mask


def check_attention(inputs: tuple[torch.Tensor, ...], dtype: str, blocks: tuple[int | None, int | None], **attrs):
    q, pk, mask = inputs[0], inputs[3], inputs[5]
    out, pres_k, pres_v = attention_kernel.launch(*inputs, block_m=blocks[0], block_n=blocks[1], **attrs)
    ref_out, ref_k, ref_v = attention.reference(*inputs, **attrs)
    assert torch.equal(pres_k, ref_k) and torch.equal(pres_v, ref_v), "present = concat(past, new), bit exact"
    s, t = q.shape[2], pk.shape[2] + q.shape[2]
    live = (attention_bias(mask, s, t, attrs["window"]) == 0).any(-1)[..., None]  # [B, 1, S, 1]: a key allowed
    assert torch.all(out.float().masked_fill(live, 0) == 0), "rows with every key masked return 0"
    if dtype == "bf16":
        return
    exact = attention.reference(*(t.float() if t.is_floating_point() else t for t in inputs), **attrs)[0]
    exact = exact.to(out.dtype).masked_fill(~live, 0)
    close(out.masked_fill(~live, 0), exact, ATTN_TOL[dtype], f"attention {dtype} vs fp32 reference")
    if dtype == "fp16":
        ref_out = ref_out.masked_fill(~live, 0)
        close(out.masked_fill(~live, 0), ref_out, ATTN_TOL_SAME_DTYPE_REFERENCE, "attention fp16 vs fp16 reference")


CASES = [  # (b, h, kv, s, p, hd, window, softcap, pad, blocks): the shapes the issue names, by name
    pytest.param(2, 4, 2, 37, 0, 24, 0, 50.0, 3, (16, 16), id="prefill-global-odd-headdim"),
    pytest.param(2, 4, 2, 40, 0, 40, 8, 50.0, 5, (16, 16), id="prefill-longer-than-window"),
    pytest.param(1, 2, 1, 9, 0, 80, 64, 0.0, 0, (16, 16), id="prefill-window-larger-than-sequence"),
    pytest.param(2, 8, 4, 1, 45, 64, 16, 50.0, 2, (16, 16), id="decode-sliding"),
    pytest.param(1, 6, 2, 1, 15, 256, 16, 50.0, 0, (None, None), id="decode-trimmed-cache-headdim256"),
    pytest.param(2, 4, 4, 1, 30, 96, 0, 30.0, 4, (None, None), id="decode-global-no-gqa"),
    pytest.param(1, 6, 2, 5, 23, 128, 8, 50.0, 0, (16, 32), id="chunk-with-past"),
    pytest.param(1, 4, 2, 20, 0, 32, 1, 0.0, 0, (None, None), id="window-1-attends-self"),
]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("b", "h", "kv", "s", "p", "hd", "window", "cap", "pad", "blocks"), CASES)
def test_attention_cases(b, h, kv, s, p, hd, window, cap, pad, blocks, dtype) -> None:
    inputs = attention_inputs(b, h, kv, s, p, hd, dtype, pad, extra_cols=2, seed=s * 131 + p)
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": hd**-0.5, "softcap": cap, "window": window}
    check_attention(inputs, dtype, blocks, **attrs)


@settings(FAST, max_examples=60)
@given(
    b=st.integers(1, 2),
    kv=st.integers(1, 3),
    n_rep=st.integers(1, 3),
    s=st.integers(1, 40),
    p=st.integers(0, 40),
    hd=st.sampled_from([16, 24, 40, 72, 80, 128]),
    window=st.sampled_from([0, 1, 5, 16, 100]),
    cap=st.sampled_from([0.0, 50.0]),
    pad=st.integers(0, 4),
    dtype=st.sampled_from(["fp32", "fp16"]),
    seed=st.integers(0, 2**16),
)
def test_attention_random_shapes(b, kv, n_rep, s, p, hd, window, cap, pad, dtype, seed) -> None:
    h = kv * n_rep
    inputs = attention_inputs(b, h, kv, s, p, hd, dtype, pad, extra_cols=1, seed=seed)
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": 2 * hd**-0.5, "softcap": cap, "window": window}
    check_attention(inputs, dtype, (16, 16), **attrs)


def test_sliding_decode_reads_only_the_window_blocks() -> None:
    """Past rows before the window's first KV block hold NaN: a kernel that visited every block and masked
    the scores would still multiply 0 by NaN in P·V. The output must be finite and match the reference."""
    b, h, kv, p, hd, window, bn = 1, 4, 2, 64, 32, 8, 16
    q, k, v, pk, pv, mask = attention_inputs(b, h, kv, 1, p, hd, "fp32", 0, extra_cols=0, seed=7)
    first_visited = ((p - window + 1) // bn) * bn  # 48: blocks [0, 48) lie wholly outside the window
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": hd**-0.5, "softcap": 50.0, "window": window}
    ref = attention.reference(q, k, v, pk, pv, mask, **attrs)[0]
    pk[:, :, :first_visited], pv[:, :, :first_visited] = float("nan"), float("nan")
    out = attention_kernel.launch(q, k, v, pk, pv, mask, block_m=16, block_n=bn, **attrs)[0]
    assert torch.isfinite(out).all()
    close(out, ref, ATTN_TOL["fp32"], "sliding decode with NaN outside the window")


def test_attention_rejects_mismatched_shapes() -> None:
    q, k, v, pk, pv, mask = attention_inputs(1, 4, 2, 3, 2, 16, "fp32", 0, extra_cols=0, seed=0)
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 16, "scale": 0.25}
    with pytest.raises(Exception, match="attention_mask"):
        attention_kernel.launch(q, k, v, pk, pv, mask[:, 1:], **attrs)
    with pytest.raises(Exception, match="past_key"):
        attention_kernel.launch(q, k, v, pk[:, :1], pv, mask, **attrs)


def test_interpreted_kernels_refuse_to_compile() -> None:
    with pytest.raises(KernelCompileError, match="TRITON_INTERPRET"):
        compile_kernel("SoftCap", 80, "fp32", cap=30.0, n_cols=64)


# ---- SlidingWindowAttentionInplace ----
# Tests are named test_inplace_* (test_kernels.py selects them by that; no other selection matches them).


def inplace_inputs(
    b: int, h: int, kv: int, s: int, c: int, hd: int, firsts: list[int], dtype: str, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, k, v, a cache full of random data (stale slots of an earlier sequence included), positions."""
    g = torch.Generator().manual_seed(seed)
    dt = DT[dtype]
    q, k, v = (torch.randn(b, n, s, hd, generator=g).to(dt) for n in (h, kv, kv))
    pk, pv = (torch.randn(b, kv, c, hd, generator=g).to(dt) for _ in range(2))
    pos = torch.tensor(firsts, dtype=torch.int64)[:, None] + torch.arange(s)
    return q, k, v, pk, pv, pos


def inplace_live(pos: torch.Tensor, slots: int, window: int) -> torch.Tensor:
    """[B, 1, S, 1]: query rows that may attend at least one key (the others are undefined by contract)."""
    keys = kv_cache.key_positions(pos, slots, window)
    return (kv_cache.position_bias(pos, keys, window) == 0).any(-1)[..., None]


def inplace_reference(inputs: tuple[torch.Tensor, ...], **attrs) -> tuple[torch.Tensor, ...]:
    """The reference on copies of the cache (it writes its past in place)."""
    q, k, v, pk, pv, pos = inputs
    return attention_inplace.reference(q, k, v, pk.clone(), pv.clone(), pos, **attrs)


def check_inplace(inputs: tuple[torch.Tensor, ...], dtype: str, blocks: tuple[int | None, int | None], **attrs):
    q, k, v, pk, pv, pos = inputs
    ref_out, ref_k, ref_v = inplace_reference(inputs, **attrs)
    cache_k, cache_v = pk.clone(), pv.clone()
    out, pres_k, pres_v = attention_inplace_kernel.launch(
        q, k, v, cache_k, cache_v, pos, block_m=blocks[0], block_n=blocks[1], **attrs
    )
    assert pres_k is cache_k and pres_v is cache_v, "the presents are the past buffers, written in place"
    assert torch.equal(pres_k, ref_k) and torch.equal(pres_v, ref_v), "the cache write, bit exact"
    live = inplace_live(pos, pk.shape[2], attrs["window"])
    assert torch.all(out.float().masked_fill(live, 0) == 0), "rows with no key to attend return 0"
    if dtype == "bf16":
        return
    exact = inplace_reference(tuple(t.float() if t.is_floating_point() else t for t in inputs), **attrs)[0]
    exact = exact.to(out.dtype).masked_fill(~live, 0)
    close(out.masked_fill(~live, 0), exact, ATTN_TOL[dtype], f"in-place attention {dtype} vs fp32 reference")
    if dtype == "fp16":
        ref_out = ref_out.masked_fill(~live, 0)
        close(out.masked_fill(~live, 0), ref_out, ATTN_TOL_SAME_DTYPE_REFERENCE, "in-place fp16 vs fp16 reference")


INPLACE_CASES = [  # (b, h, kv, s, slots, hd, window, cap, first position of each row, blocks)
    pytest.param(2, 4, 2, 1, 16, 32, 16, 50.0, [40, 3], (16, 16), id="decode-ring-wrapped-and-not"),
    pytest.param(3, 4, 2, 1, 64, 40, 0, 50.0, [45, 3, 0], (16, 16), id="decode-global-rows-apart"),
    pytest.param(1, 6, 2, 1, 20, 256, 16, 50.0, [100], (None, None), id="decode-ring-headdim256"),
    pytest.param(2, 4, 2, 40, 8, 24, 8, 50.0, [0, -5], (16, 16), id="prompt-longer-than-ring-padded"),
    pytest.param(2, 4, 2, 37, 48, 24, 0, 30.0, [0, -3], (16, 16), id="prefill-global-padded-odd-headdim"),
    pytest.param(2, 4, 2, 5, 12, 40, 8, 0.0, [21, 30], (16, 32), id="chunk-continuing-ring"),
    pytest.param(2, 6, 2, 6, 64, 80, 0, 50.0, [17, 9], (16, 16), id="chunk-continuing-global"),
    pytest.param(2, 4, 4, 9, 16, 96, 16, 50.0, [-4, 2], (None, None), id="chunk-padded-no-gqa"),
    pytest.param(1, 4, 2, 20, 20, 32, 1, 0.0, [0], (None, None), id="window-1-attends-self"),
    # out of contract (the runtime sizes a global buffer past the last position), still the reference's keys
    pytest.param(1, 4, 2, 20, 8, 16, 0, 50.0, [3], (16, 16), id="global-buffer-shorter-than-prompt"),
]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("b", "h", "kv", "s", "c", "hd", "window", "cap", "firsts", "blocks"), INPLACE_CASES)
def test_inplace_cases(b, h, kv, s, c, hd, window, cap, firsts, blocks, dtype) -> None:
    inputs = inplace_inputs(b, h, kv, s, c, hd, firsts, dtype, seed=s * 131 + c)
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": hd**-0.5, "softcap": cap, "window": window}
    check_inplace(inputs, dtype, blocks, **attrs)


@settings(FAST, max_examples=40)
@given(
    b=st.integers(1, 3),
    kv=st.integers(1, 2),
    n_rep=st.integers(1, 3),
    s=st.integers(1, 24),
    c=st.integers(1, 40),
    hd=st.sampled_from([16, 24, 40, 72]),
    window=st.sampled_from([0, 1, 5, 16]),
    cap=st.sampled_from([0.0, 50.0]),
    firsts=st.lists(st.integers(-30, 60), min_size=3, max_size=3),
    dtype=st.sampled_from(["fp32", "fp16"]),
    seed=st.integers(0, 2**16),
)
def test_inplace_random_shapes(b, kv, n_rep, s, c, hd, window, cap, firsts, dtype, seed) -> None:
    """Any positions, any cache length (the sizing rules are the runtime's: kernel and reference read the same
    keys even from an undersized ring or a global buffer that wrapped)."""
    h = kv * n_rep
    inputs = inplace_inputs(b, h, kv, s, c, hd, firsts[:b], dtype, seed=seed)
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": 2 * hd**-0.5, "softcap": cap, "window": window}
    check_inplace(inputs, dtype, (16, 16), **attrs)


@pytest.mark.parametrize(
    ("s", "c", "window", "firsts"),
    [
        (1, 16, 16, [40, 3]),  # decode on a wrapped ring
        (1, 64, 0, [45, 0]),  # global decode
        (40, 8, 8, [0, -5]),  # a prompt longer than the ring, padded
        (5, 12, 8, [21, 30]),  # a chunk continuing a sequence
        (6, 24, 0, [17, 30]),  # a global chunk, one row's buffer wrapped
    ],
)
def test_inplace_reads_no_slot_it_writes(s, c, window, firsts) -> None:
    """The write/read race, checked whatever order the programs run in: the cache the attention reads holds
    NaN in every slot it must not read (this step's slots, those behind the window, stale and never-written
    ones), and the write goes to a separate buffer. A read of any of those slots would turn the output NaN;
    the output must match the reference, and the separate buffer must hold exactly the written slots."""
    b, h, kv, hd = 2, 4, 2, 16
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": hd**-0.5, "softcap": 50.0, "window": window}
    q, k, v, pk, pv, pos = inputs = inplace_inputs(b, h, kv, s, c, hd, firsts, "fp32", seed=c)
    ref_out, ref_k, ref_v = inplace_reference(inputs, **attrs)
    first, last = pos[:, :1], pos[:, -1:]
    held = last - torch.remainder(last - torch.arange(c), c)  # [B, C]: position of each slot after the write
    lo = torch.clamp(first - window + 1, min=0) if window else torch.zeros_like(first)
    readable = (held >= lo) & (held < first)  # old positions some query needs
    written = held >= first
    poisoned_k, poisoned_v = (t.masked_fill(~readable[:, None, :, None], float("nan")) for t in (pk, pv))
    pres_k, pres_v = torch.full_like(pk, 7.0), torch.full_like(pv, 7.0)
    out = torch.empty_like(q)
    kernel = attention_inplace_kernel.plan("fp32", block_m=16, block_n=16, **attrs)
    kernel.run([q, k, v, poisoned_k, poisoned_v, pos], [out, pres_k, pres_v])
    live = inplace_live(pos, c, window)
    assert torch.isfinite(out).all()
    close(out.masked_fill(~live, 0), ref_out.masked_fill(~live, 0), ATTN_TOL["fp32"], "attention on a poisoned cache")
    w = written[:, None, :, None].expand_as(pk)
    assert torch.equal(pres_k[w], ref_k[w]) and torch.equal(pres_v[w], ref_v[w]), "the step's slots, written"
    assert bool((pres_k[~w] == 7.0).all() and (pres_v[~w] == 7.0).all()), "no other slot written"


def test_inplace_generation_sequence() -> None:
    """One cache through a whole generation, kernel vs reference step by step: batch 3 with left padding, a
    prompt longer than the ring in one call, a chunk continuing it, then decode steps that wrap the ring
    (6 slots, window 4) several times; the global layer's buffer alongside."""
    b, h, kv, hd, window, ring, length = 3, 4, 2, 16, 4, 6, 40
    attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": hd**-0.5, "softcap": 50.0}
    g = torch.Generator().manual_seed(5)
    caches = {w: torch.randn(2, b, kv, ring if w else length, hd, generator=g) for w in (window, 0)}  # stale
    ours = {w: c.clone() for w, c in caches.items()}
    pos = torch.arange(9)[None, :] - torch.tensor([[0], [2], [5]])  # prompts of 9, 7 and 4 tokens
    steps = [pos, pos[:, -1:] + 1 + torch.arange(3)] + [None] * 20  # prefill, a chunk of 3, 20 decode steps
    worst = 0.0
    for step in steps:
        pos = step if step is not None else pos[:, -1:] + 1
        s = pos.shape[1]
        q = torch.randn(b, h, s, hd, generator=g)
        k, v = torch.randn(b, kv, s, hd, generator=g), torch.randn(b, kv, s, hd, generator=g)
        for w in (window, 0):
            ref = attention_inplace.reference(q, k, v, caches[w][0], caches[w][1], pos, window=w, **attrs)
            got = attention_inplace_kernel.launch(q, k, v, ours[w][0], ours[w][1], pos, window=w, **attrs)
            assert torch.equal(ours[w], caches[w]), f"caches diverge at position {int(pos[0, -1])}, window {w}"
            live = inplace_live(pos, ours[w].shape[3], w)
            worst = max(worst, (got[0] - ref[0]).masked_fill(~live, 0).abs().max().item())
    assert int(pos[0, -1]) > 4 * ring  # the ring wrapped several times
    assert worst <= ATTN_TOL["fp32"][0], worst


def test_inplace_bad_inputs() -> None:
    q, k, v, pk, pv, pos = inplace_inputs(1, 4, 2, 3, 8, 16, [0], "fp32", seed=0)
    attrs = {"num_heads": 4, "kv_heads": 2, "head_dim": 16, "scale": 0.25}
    with pytest.raises(G2trtError, match="position_ids has shape"):
        attention_inplace_kernel.launch(q, k, v, pk, pv, pos[:, 1:], **attrs)
    with pytest.raises(G2trtError, match="past_value has shape"):
        attention_inplace_kernel.launch(q, k, v, pk, pv[:, :, :4], **attrs, position_ids=pos)
    with pytest.raises(G2trtError, match="position_ids must be int64"):
        attention_inplace_kernel.launch(q, k, v, pk, pv, pos.int(), **attrs)
    strided = torch.randn(1, 2, 16, 16)[:, :, ::2]
    with pytest.raises(G2trtError, match="must be contiguous"):
        attention_inplace_kernel.launch(q, k, v, strided, pv, pos, **attrs)

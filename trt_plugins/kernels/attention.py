"""Triton kernel of the SlidingWindowAttention plugin: flash attention with GQA, soft-cap, sliding window,
padding mask, and the KV-cache append fused into the same launch.

Layout of the grid: axis 1 is one (batch, kv head) pair; axis 0 holds first the attention tiles, then the
copy tiles of that pair:

* attention tiles: the n_rep = H / KV query heads that share a KV head are packed into the rows of one tile
  (row i = query position i // n_rep, head i % n_rep), so each K/V block is loaded once for the whole group
  and used by n_rep heads (GQA without repeating K/V). Rows keep an online softmax (running max, sum and
  fp32 accumulator) over KV blocks; scores are `q kᵀ * scale` in fp32, soft-capped, then masked (causal,
  window, attention_mask == 0) with -inf. The KV loop runs only over the blocks that intersect
  [first query - window + 1, last query] of the tile (causal: [0, last query]): its bounds come from the
  window, so a sliding layer reads at most window + tile keys per tile whatever the context length.
  K/V rows < P are read from past_key/value, the others from key/value: no concatenated copy is needed first.
* copy tiles: present = concat(past, new) written COPY_M rows at a time. TensorRT's AOT plugins launch one
  kernel per plugin, so the append is fused here as extra programs rather than a second kernel.

Query rows whose keys are all masked (left-padding rows with no real key yet) return 0; the reference returns
the mean of all values there. Both are "undefined by contract" (callers ignore padded rows); 0 never
propagates NaN/Inf into the cache.

Parameters: q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr | S, P, M (int32: query length, past length,
attention_mask columns) | out_ptr, pres_k_ptr, pres_v_ptr; constexprs H, KV, HEAD_DIM, SCALE, SOFTCAP,
WINDOW, BLOCK_M, BLOCK_N, BLOCK_D (next power of two >= max(HEAD_DIM, 16): odd head dims are masked), COPY_M.
Grid: (cdiv(S * n_rep, BLOCK_M) + cdiv(P + S, COPY_M), B * KV, 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from export.errors import G2trtError
from trt_plugins import attention as op
from trt_plugins.attention import SPEC
from trt_plugins.kernels.common import Cdiv, KernelPlan, dtype_name, next_pow2, resolve_dtypes, tanh_f32

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535


@triton.jit
def _kv_rows(past_ptr, new_ptr, kv, rows, d, P, S, HEAD_DIM: tl.constexpr):
    """K or V rows `rows` [N] x dims `d` [D] of concat(past, new) for kv pair `kv` (int64), 0 outside."""
    d_ok = d[None, :] < HEAD_DIM
    in_past = rows < P
    in_new = (rows >= P) & (rows < P + S)
    past = tl.load(
        past_ptr + ((kv * P + rows) * HEAD_DIM)[:, None] + d[None, :], mask=in_past[:, None] & d_ok, other=0.0
    )
    new = tl.load(
        new_ptr + ((kv * S + rows - P) * HEAD_DIM)[:, None] + d[None, :], mask=in_new[:, None] & d_ok, other=0.0
    )
    return tl.where(in_past[:, None], past, new)


@triton.jit
def _dot(a, b):
    # fp32 inputs would default to TF32 on sm_80+ (10-bit mantissa); the fp32 plugin promises fp32 scores.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _block(
    q, acc, m_i, l_i, k_rows, v_rows, j, j_ok, qpos, mask_row, d,
    HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """One KV block of the online softmax: keys at absolute positions `j` [N] (`j_ok`: inside the source),
    `k_rows` [1, N] / `v_rows` [N, 1] pointers to each key's row."""
    kt = tl.load(k_rows + d[:, None], mask=j_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)  # [D, N]
    scores = _dot(q, kt) * SCALE
    if SOFTCAP > 0:
        scores = tanh_f32(scores / SOFTCAP) * SOFTCAP  # before the mask, as Gemma 2 does
    keep = tl.load(mask_row + j, mask=j_ok, other=0) != 0
    ok = keep[None, :] & (j[None, :] <= qpos[:, None])
    if WINDOW > 0:
        ok = ok & (j[None, :] > qpos[:, None] - WINDOW)
    scores = tl.where(ok, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: no inf - inf
    p = tl.exp2((scores - m_use[:, None]) * 1.4426950408889634)
    alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
    v = tl.load(v_rows + d[None, :], mask=j_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, tile, kv, b, g, S, P, M,
    H: tl.constexpr, KV: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    N_REP: tl.constexpr = H // KV
    T = P + S
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (query position, head in group)
    s = rows // N_REP
    head = g * N_REP + rows % N_REP
    row_ok = rows < S * N_REP
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q_off = (((b * H + head).to(tl.int64) * S + s) * HEAD_DIM)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    qpos = P + s  # absolute position of each row's query among the T keys

    # Only the KV blocks that intersect [first query - window + 1, last query] of this tile.
    last_q = P + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // N_REP, S - 1)
    hi = last_q + 1
    if WINDOW > 0:  # noqa: SIM108 - a constexpr `if` is resolved at compile time; keep it a statement
        lo = tl.maximum(P + (tile * BLOCK_M) // N_REP - WINDOW + 1, 0)
    else:
        lo = 0
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mask_row = mask_ptr + b.to(tl.int64) * M + (M - T)  # attention_mask columns of the T keys
    # Keys from the past cache, then this call's keys: each block reads one source only.
    for start in range(lo, tl.minimum(hi, P), BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _block(
            q, acc, m_i, l_i, pk_ptr + (kv * P + j)[None, :] * HEAD_DIM, pv_ptr + (kv * P + j)[:, None] * HEAD_DIM,
            j, j < P, qpos, mask_row, d, HEAD_DIM, SCALE, SOFTCAP, WINDOW,
        )  # fmt: skip
    for start in range((tl.maximum(lo - P, 0) // BLOCK_N) * BLOCK_N, hi - P, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _block(
            q, acc, m_i, l_i, k_ptr + (kv * S + t)[None, :] * HEAD_DIM, v_ptr + (kv * S + t)[:, None] * HEAD_DIM,
            P + t, t < S, qpos, mask_row, d, HEAD_DIM, SCALE, SOFTCAP, WINDOW,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _append(
    past_ptr, new_ptr, present_ptr, tile, kv, S, P,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, COPY_M: tl.constexpr,
):  # fmt: skip
    rows = tile * COPY_M + tl.arange(0, COPY_M)
    d = tl.arange(0, BLOCK_D)
    vals = _kv_rows(past_ptr, new_ptr, kv, rows, d, P, S, HEAD_DIM)
    dst = present_ptr + ((kv * (P + S) + rows) * HEAD_DIM)[:, None] + d[None, :]
    tl.store(dst, vals, mask=(rows < P + S)[:, None] & (d[None, :] < HEAD_DIM))


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr,
    S, P, M,
    out_ptr, pres_k_ptr, pres_v_ptr,
    H: tl.constexpr, KV: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COPY_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kv_pair = tl.program_id(1)  # b * KV + g
    b = kv_pair // KV
    g = kv_pair % KV
    kv = kv_pair.to(tl.int64)
    n_tiles = tl.cdiv(S * (H // KV), BLOCK_M)
    if pid < n_tiles:
        _attend(
            q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, pid, kv, b, g, S, P, M,
            H, KV, HEAD_DIM, SCALE, SOFTCAP, WINDOW, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    else:
        _append(pk_ptr, k_ptr, pres_k_ptr, pid - n_tiles, kv, S, P, HEAD_DIM, BLOCK_D, COPY_M)
        _append(pv_ptr, v_ptr, pres_v_ptr, pid - n_tiles, kv, S, P, HEAD_DIM, BLOCK_D, COPY_M)


def default_blocks(dtype: str, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), chosen to need at most 48 KiB of shared memory on every
    target, so a launcher needs no opt-in for more; untuned (no GPU yet): `plan(...)` takes overrides."""
    if dtype == "fp32":
        return {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 1)}.get(
            block_d, (16, 16, 4, 1)
        )
    return {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 1)}.get(
        block_d, (64, 16, 4, 1)
    )


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The checked head geometry and tile sizes of an attention kernel (this one and the in-place one)."""

    n_rep: int  # query heads per KV head
    block_m: int
    copy_m: int  # tokens per append / write tile
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]


def tiles(
    plugin: str,
    float_dtype: str,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    softcap: float,
    window: int,
    block_m: int | None,
    block_n: int | None,
) -> Tiles:
    """Check one plugin node's head attributes and choose its tiles (`default_blocks`, overridable)."""
    h, kvh, hd = int(num_heads), int(kv_heads), int(head_dim)
    if h <= 0 or kvh <= 0 or h % kvh:
        raise G2trtError(f"plugin {plugin}: num_heads {h} must be a positive multiple of kv_heads {kvh}")
    if not 0 < hd <= MAX_HEAD_DIM:
        raise G2trtError(f"plugin {plugin}: head_dim {hd} not in 1..{MAX_HEAD_DIM}")
    if int(window) < 0 or float(softcap) < 0:
        raise G2trtError(f"plugin {plugin}: window and softcap must be >= 0, got {window}, {softcap}")
    block_d = max(16, next_pow2(hd))
    bm, bn, warps, stages = default_blocks(float_dtype, block_d)
    bm, bn = block_m or bm, block_n or bn
    if not (16 <= bm <= 128 and 16 <= bn <= 128) or bm & (bm - 1) or bn & (bn - 1):
        raise G2trtError(f"plugin {plugin}: block sizes must be powers of two in 16..128, got {bm}x{bn}")
    copy_m = max(8, 4096 // block_d)
    constexprs = {
        "H": h,
        "KV": kvh,
        "HEAD_DIM": hd,
        "SCALE": float(scale),
        "SOFTCAP": float(softcap),
        "WINDOW": int(window),
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_D": block_d,
        "COPY_M": copy_m,
    }
    return Tiles(h // kvh, bm, copy_m, warps, stages, constexprs)


def plan(
    dtype: str,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    tensor_dtypes: Mapping[str, str] | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> KernelPlan:
    """The kernel for one plugin node's attributes; q, k, v and the past share `dtype` (int64 attention_mask);
    out has query's dtype and presents key's. Block sizes default to `default_blocks`."""
    dts = resolve_dtypes(SPEC, dtype, tensor_dtypes, fixed={"attention_mask": "i64"})
    out_dt, pres_k_dt, pres_v_dt = op.output_dtypes(*dts.values())
    floats = {dts[n] for n in SPEC.inputs if n != "attention_mask"}
    if len(floats) != 1:
        raise G2trtError(f"plugin {SPEC.name}: query, key, value and the past must share one dtype, got {dts}")
    (float_dtype,) = floats
    t = tiles(SPEC.name, float_dtype, num_heads, kv_heads, head_dim, scale, softcap, window, block_m, block_n)
    bm, copy_m, n_rep, kvh = t.block_m, t.copy_m, t.n_rep, int(kv_heads)

    def grid(shapes: Sequence[Sequence[Any]], cdiv: Cdiv) -> tuple[Any, Any, Any]:
        s, p = shapes[0][2], shapes[3][2]
        return cdiv(s * n_rep, bm) + cdiv(p + s, copy_m), shapes[0][0] * kvh, 1

    def scalars(shapes: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        return shapes[0][2], shapes[3][2], shapes[5][1]

    return KernelPlan(
        plugin=SPEC.name,
        fn=attention_kernel,
        input_args=("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "mask_ptr"),
        scalar_args=("S", "P", "M"),
        output_args=("out_ptr", "pres_k_ptr", "pres_v_ptr"),
        pointer_types={
            "q_ptr": f"*{dts['query']}",
            "k_ptr": f"*{dts['key']}",
            "v_ptr": f"*{dts['value']}",
            "pk_ptr": f"*{dts['past_key']}",
            "pv_ptr": f"*{dts['past_value']}",
            "mask_ptr": "*i64",
            "out_ptr": f"*{out_dt}",
            "pres_k_ptr": f"*{pres_k_dt}",
            "pres_v_ptr": f"*{pres_v_dt}",
        },
        constexprs=t.constexprs,
        num_warps=num_warps or t.num_warps,
        num_stages=num_stages or t.num_stages,
        grid=grid,
        scalars=scalars,
    )


def launch(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    attention_mask: Tensor,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as `trt_plugins.attention.reference` (block sizes overridable, for tests and tuning)."""
    b, s = query.shape[0], query.shape[2]
    p = past_key.shape[2]
    expect = {
        "query": (b, num_heads, s, head_dim),
        "key": (b, kv_heads, s, head_dim),
        "value": (b, kv_heads, s, head_dim),
        "past_key": (b, kv_heads, p, head_dim),
        "past_value": (b, kv_heads, p, head_dim),
    }
    tensors = dict(zip(SPEC.inputs, (query, key, value, past_key, past_value, attention_mask), strict=True))
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise G2trtError(f"plugin {SPEC.name}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < p + s:
        raise G2trtError(f"plugin {SPEC.name}: attention_mask {tuple(attention_mask.shape)} must be [{b}, >= {p + s}]")
    if b * kv_heads > MAX_GRID_Y:
        raise G2trtError(f"plugin {SPEC.name}: batch * kv_heads = {b * kv_heads} exceeds the grid's {MAX_GRID_Y}")
    inputs = [t.contiguous() for t in tensors.values()]
    names = {n: dtype_name(t) for n, t in zip(SPEC.inputs, inputs, strict=True)}
    kernel = plan(
        names["query"],
        num_heads=num_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=scale,
        softcap=softcap,
        window=window,
        tensor_dtypes=names,
        block_m=block_m,
        block_n=block_n,
    )
    shapes = op.output_shapes(*(tuple(t.shape) for t in inputs))
    dtypes = op.output_dtypes(*(t.dtype for t in inputs))
    outputs = [torch.empty(s, dtype=d, device=query.device) for s, d in zip(shapes, dtypes, strict=True)]
    kernel.run(inputs, outputs)
    return outputs[0], outputs[1], outputs[2]

"""Triton kernel of the SlidingWindowAttentionInplace plugin: flash attention over the in-place KV cache
(export/kv_cache.py) with GQA, soft-cap and sliding window, and this step's K/V written into the cache
buffer in the same launch.

The contract, from the kernel's side (a row's positions are consecutive: first .. last = first + S - 1):

* write: the last n = min(S, C) tokens of the step go to slots `position mod C` of the cache buffer;
* read: the keys a query may attend are the positions in (last - C, last] that are >= 0 (what the buffer
  holds after the write), causal, and for a sliding layer inside the window. A sliding layer's reference
  reads "ring entries older than `first`, plus this step's keys"; a global layer's reads "the written
  buffer". Both are the same set: old positions [max(0, last - C + 1), first) from the cache, and this
  step's positions (> last - C for a global layer; all of them for a sliding one) from key / value.

Write/read ordering on a GPU: the attention programs never read a slot this launch writes. They read the
step's own keys from the `key` / `value` inputs (bit-identical to what the write stores: one dtype), and
from the cache only the slots of positions in [max(0, last - C + 1), first), with masked loads (a masked
lane touches no memory). The write programs store only the slots of positions in [max(first, last - C + 1),
last]. Both ranges lie inside the C consecutive positions (last - C, last], which map to C distinct slots,
so the read and write sets are disjoint: no CTA can see a write of this step, whatever order the GPU runs
them in, with no grid-wide barrier and no second launch (TensorRT's AOT plugins launch one kernel). The
alternatives were worse: a write launched after the attention needs two kernels; reading the written
buffer needs a grid-wide barrier, which a plugin launch cannot make safe (CTAs are not co-resident).

Grid: axis 1 is one (batch, kv head) pair; axis 0 holds first the attention tiles, then the write tiles:

* attention tiles: the n_rep = H / KV query heads of one KV head are packed into the rows of a tile (row i
  = query position i // n_rep, head i % n_rep), so each K/V block is loaded once for the whole group.
  Online softmax in fp32 (running max, sum, fp32 accumulator); scores `q kᵀ * scale` in fp32, soft-capped,
  then masked by position (causal, window) with -inf. Two loops, each reading one source: cache slots of
  old positions from the tile's window start (`first query - window + 1`; global: the oldest held
  position) to `first - 1`, then this step's keys up to the tile's last query. A sliding tile reads at
  most window + tile keys whatever the cache length; positions below a tile's window start, padding keys
  (negative positions) and stale slots are never loaded.
* write tiles: COPY_M of the step's tokens each, stored at slot `position mod C` (floor mod: padding's
  negative positions land in slots no query reads). Tokens before the last min(S, C) are skipped, so no
  slot is written twice.

Query rows with no key to attend (left padding, negative positions) return 0; the reference returns the
mean of the values there. Both are "undefined by contract" (callers ignore padded rows); 0 never brings
NaN/Inf into a later layer.

`present_key` / `present_value` must be the memory of `past_key` / `past_value`: the kernel writes only this
step's tokens (the plugin declares the aliasing; `launch` passes the same tensors). Positions and the cache
length are int32 inside the kernel (|position| < 2^31); element offsets are int64.

Parameters: q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pos_ptr | S, C (int32: query length, cache slots) |
out_ptr, pres_k_ptr, pres_v_ptr; constexprs H, KV, HEAD_DIM, SCALE, SOFTCAP, WINDOW, BLOCK_M, BLOCK_N,
BLOCK_D (next power of two >= max(HEAD_DIM, 16): odd head dims are masked), COPY_M.
Grid: (cdiv(S * n_rep, BLOCK_M) + cdiv(S, COPY_M), B * KV, 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from export.errors import G2trtError
from trt_plugins import attention_inplace as op
from trt_plugins.attention_inplace import SPEC
from trt_plugins.kernels.attention import MAX_GRID_Y, _dot, tiles
from trt_plugins.kernels.common import Cdiv, KernelPlan, dtype_name, resolve_dtypes, tanh_f32


@triton.jit
def _block(
    q, acc, m_i, l_i, k_rows, v_rows, j, j_ok, qpos, d,
    HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """One KV block of the online softmax: keys at positions `j` [N] (`j_ok`: the only ones loaded),
    `k_rows` [1, N] / `v_rows` [N, 1] pointers to each key's row."""
    kt = tl.load(k_rows + d[:, None], mask=j_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)  # [D, N]
    scores = _dot(q, kt) * SCALE
    if SOFTCAP > 0:
        scores = tanh_f32(scores / SOFTCAP) * SOFTCAP  # before the mask, as Gemma 2 does
    ok = j_ok[None, :] & (j[None, :] <= qpos[:, None])
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
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, tile, kv, b, g, first, S, C,
    H: tl.constexpr, KV: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    N_REP: tl.constexpr = H // KV
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (query index, head in group)
    s = rows // N_REP
    head = g * N_REP + rows % N_REP
    row_ok = rows < S * N_REP
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q_off = (((b * H + head).to(tl.int64) * S + s) * HEAD_DIM)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    qpos = first + s  # each row's query position
    s_lo = (tile * BLOCK_M) // N_REP  # the tile's first and last query index
    s_hi = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // N_REP, S - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Old positions from the cache: [max(0, last - C + 1, window start), first). Never a slot this launch
    # writes (those hold positions >= first); positions below last - C + 1 share a slot with a newer one.
    lo = tl.maximum(first + S - C, 0)
    if WINDOW > 0:
        lo = tl.maximum(lo, first + s_lo - WINDOW + 1)
    for start in range(lo, first, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        slot = kv * C + j % C  # j >= 0 here
        acc, m_i, l_i = _block(
            q, acc, m_i, l_i, pk_ptr + slot[None, :] * HEAD_DIM, pv_ptr + slot[:, None] * HEAD_DIM,
            j, j < first, qpos, d, HEAD_DIM, SCALE, SOFTCAP, WINDOW,
        )  # fmt: skip

    # This step's keys from key/value: index t >= 0 is position first + t; padding (negative) never, and a
    # global layer's buffer keeps only positions > last - C (t >= S - C).
    t_lo = tl.maximum(-first, 0)
    if WINDOW > 0:  # noqa: SIM108 - a constexpr `if` is resolved at compile time; keep it a statement
        t_lo = tl.maximum(t_lo, s_lo - WINDOW + 1)
    else:
        t_lo = tl.maximum(t_lo, S - C)
    for start in range(t_lo, s_hi + 1, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _block(
            q, acc, m_i, l_i, k_ptr + (kv * S + t)[None, :] * HEAD_DIM, v_ptr + (kv * S + t)[:, None] * HEAD_DIM,
            first + t, t < S, qpos, d, HEAD_DIM, SCALE, SOFTCAP, WINDOW,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _write(
    new_ptr, cache_ptr, tile, kv, first, S, C,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, COPY_M: tl.constexpr,
):  # fmt: skip
    """This step's tokens [tile * COPY_M, + COPY_M) into slots `position mod C`: only the last min(S, C)."""
    t = tile * COPY_M + tl.arange(0, COPY_M)
    d = tl.arange(0, BLOCK_D)
    ok = ((t < S) & (t >= S - C))[:, None] & (d[None, :] < HEAD_DIM)
    slot = ((first + t) % C + C) % C  # floor mod whatever sign `%` keeps (padding positions are negative)
    vals = tl.load(new_ptr + ((kv * S + t) * HEAD_DIM)[:, None] + d[None, :], mask=ok, other=0.0)
    tl.store(cache_ptr + ((kv * C + slot) * HEAD_DIM)[:, None] + d[None, :], vals, mask=ok)


@triton.jit
def attention_inplace_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pos_ptr,
    S, C,
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
    first = tl.load(pos_ptr + b.to(tl.int64) * S).to(tl.int32)  # the row's first position
    n_tiles = tl.cdiv(S * (H // KV), BLOCK_M)
    if pid < n_tiles:
        _attend(
            q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, pid, kv, b, g, first, S, C,
            H, KV, HEAD_DIM, SCALE, SOFTCAP, WINDOW, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    else:
        _write(k_ptr, pres_k_ptr, pid - n_tiles, kv, first, S, C, HEAD_DIM, BLOCK_D, COPY_M)
        _write(v_ptr, pres_v_ptr, pid - n_tiles, kv, first, S, C, HEAD_DIM, BLOCK_D, COPY_M)


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
    """The kernel for one plugin node's attributes; q, k, v and the cache share `dtype` (int64 position_ids).
    Block sizes default to SlidingWindowAttention's `default_blocks` (same tiles, same shared memory)."""
    dts = resolve_dtypes(SPEC, dtype, tensor_dtypes, fixed={"position_ids": "i64"})
    out_dt, pres_k_dt, pres_v_dt = op.output_dtypes(*dts.values())
    floats = {dts[n] for n in SPEC.inputs if n != "position_ids"}
    if len(floats) != 1:
        raise G2trtError(f"plugin {SPEC.name}: query, key, value and the cache must share one dtype, got {dts}")
    (float_dtype,) = floats
    t = tiles(SPEC.name, float_dtype, num_heads, kv_heads, head_dim, scale, softcap, window, block_m, block_n)
    bm, copy_m, n_rep, kvh = t.block_m, t.copy_m, t.n_rep, int(kv_heads)

    def grid(shapes: Sequence[Sequence[Any]], cdiv: Cdiv) -> tuple[Any, Any, Any]:
        s = shapes[0][2]
        return cdiv(s * n_rep, bm) + cdiv(s, copy_m), shapes[0][0] * kvh, 1

    def scalars(shapes: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        return shapes[0][2], shapes[3][2]

    return KernelPlan(
        plugin=SPEC.name,
        fn=attention_inplace_kernel,
        input_args=("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "pos_ptr"),
        scalar_args=("S", "C"),
        output_args=("out_ptr", "pres_k_ptr", "pres_v_ptr"),
        pointer_types={
            "q_ptr": f"*{dts['query']}",
            "k_ptr": f"*{dts['key']}",
            "v_ptr": f"*{dts['value']}",
            "pk_ptr": f"*{dts['past_key']}",
            "pv_ptr": f"*{dts['past_value']}",
            "pos_ptr": "*i64",
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
    position_ids: Tensor,
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
    """Same contract as `trt_plugins.attention_inplace.reference`: writes `past_key` / `past_value` in place
    (they must be contiguous) and returns them as the presents (block sizes overridable, for tests)."""
    b, s = query.shape[0], query.shape[2]
    c = past_key.shape[2]
    expect = {
        "query": (b, num_heads, s, head_dim),
        "key": (b, kv_heads, s, head_dim),
        "value": (b, kv_heads, s, head_dim),
        "past_key": (b, kv_heads, c, head_dim),
        "past_value": (b, kv_heads, c, head_dim),
        "position_ids": (b, s),
    }
    tensors = dict(zip(SPEC.inputs, (query, key, value, past_key, past_value, position_ids), strict=True))
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise G2trtError(f"plugin {SPEC.name}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    if c < 1:
        raise G2trtError(f"plugin {SPEC.name}: the cache needs at least one slot, got {c}")
    if position_ids.dtype != torch.int64:
        raise G2trtError(f"plugin {SPEC.name}: position_ids must be int64, got {position_ids.dtype}")
    if not (past_key.is_contiguous() and past_value.is_contiguous()):
        raise G2trtError(f"plugin {SPEC.name}: past_key and past_value must be contiguous (written in place)")
    if b * kv_heads > MAX_GRID_Y:
        raise G2trtError(f"plugin {SPEC.name}: batch * kv_heads = {b * kv_heads} exceeds the grid's {MAX_GRID_Y}")
    inputs = [t if t is past_key or t is past_value else t.contiguous() for t in tensors.values()]
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
    out = torch.empty_like(inputs[0])
    kernel.run(inputs, [out, past_key, past_value])
    return out, past_key, past_value

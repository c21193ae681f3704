"""The in-place KV cache contract: fixed-size buffers, written at each token's position, masked by position.

    past_key_values.{i}.key|value  [B, KV, C_i, Dh]   C_i: max cache length (global layers) or a ring of
                                                       C_i >= sliding_window slots (sliding layers)
    present.{i}.key|value          the same buffers after this step's write (the runtime binds the same memory)

Rules (the whole contract; export.model, the graph passes, the plugin and the runtimes all follow them):
- `position_ids [B, S]` are consecutive in each row; left padding takes the positions *before* the first
  real token (negative), so a row's first real token of a fresh sequence is at position 0 and "position
  < 0" is what marks padding. No attention_mask: every mask follows from positions.
- Write: the token at position p goes to slot `p mod C`. Each row writes the last `n = min(S, C)` tokens of
  the step as one block starting at slot `(last - n + 1) mod C` (ONNX `TensorScatter`, mode circular);
  padding therefore lands in slots of negative positions, which no query can see.
- Read: after the write, slot s of a row whose last position is `last` holds position
  `last - ((last - s) mod C)`, valid if >= 0 (stale data from an earlier sequence in that row resolves to
  a negative position). Global layers attend over their buffer; sliding layers attend over their ring
  (old positions only) plus this step's own keys, so a prompt longer than the ring works in one call.
- Aliasing: `past` feeds only the write; attention reads `present`. So a runtime may bind past and present
  to one buffer (onnxruntime's TensorScatter and GroupQueryAttention then write only the new tokens).
- Sizing (the runtime's job): global C > the last position ever written; a ring needs C >= window for
  decode and C >= window + S - 1 for a multi-token step that continues a sequence (chunked prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor

INVALID = 2**62  # the position of a slot or key that holds nothing of this sequence: no query reaches it


@torch.library.custom_op("g2trt::kv_write", mutates_args=())
def kv_write(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """`cache [B, KV, C, Dh]` with `update [B, KV, n, Dh]` written at slots `(write_index[b] + i) mod C`.

    Functional, as torch.export needs; exports as ONNX `TensorScatter(axis=2, mode="circular")`.
    """
    return cache.scatter(2, _slots(cache, update, write_index), update)


@kv_write.register_fake
def _(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    return torch.empty_like(cache)


def _slots(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    b, kv, n, d = update.shape
    slots = _mod(write_index[:, None] + torch.arange(n, device=update.device), cache.shape[2])  # [B, n]
    return slots[:, None, :, None].expand(b, kv, n, d)


def _mod(x: Tensor, n: int) -> Tensor:
    """`x mod n` in [0, n) (floor semantics, ONNX Mod fmod=0); `n` as a tensor so a symbolic length exports."""
    return torch.remainder(x, torch.full((), n, dtype=x.dtype, device=x.device))


def write(cache: Tensor, new: Tensor, position_ids: Tensor) -> Tensor:
    """The cache after writing `new [B, KV, S, Dh]` by the contract's rule.

    Eager PyTorch writes into `cache` itself (what the runtimes do with a shared buffer); under
    torch.export the functional `g2trt::kv_write` op stands for it, so the graph gets one TensorScatter.
    """
    slots = cache.shape[2]
    n = torch.sym_min(new.shape[2], slots)  # no guard on S <= C: one graph serves both
    update = new[:, :, new.shape[2] - n :]
    index = _mod(position_ids[:, -1] - (n - 1), slots)  # [B]
    if torch.compiler.is_exporting():
        return torch.ops.g2trt.kv_write(cache, update, index)
    return cache.scatter_(2, _slots(cache, update, index), update)


def slot_positions(position_ids: Tensor, slots: int, before: Tensor | None = None) -> Tensor:
    """Position held by each of `slots` slots after this step's write, per row [B, slots]; INVALID for none.

    `before [B, 1]`: only positions below it count (a ring's old entries; this step's keys are read
    from the step itself).
    """
    last = position_ids[:, -1:]  # [B, 1]
    s = torch.arange(slots, device=position_ids.device)
    held = last - _mod(last - s, slots)
    valid = held >= 0 if before is None else (held >= 0) & (held < before)
    return torch.where(valid, held, INVALID)


def new_key_positions(position_ids: Tensor) -> Tensor:
    """Positions of this step's own keys [B, S]; padding (negative) is INVALID."""
    return torch.where(position_ids >= 0, position_ids, INVALID)


def key_positions(position_ids: Tensor, slots: int, window: int) -> Tensor:
    """The position held by each key a layer attends to: [B, C] (global: its buffer) or [B, C + S]
    (sliding: the ring's entries from before this step, then this step's own keys)."""
    if window:
        old = slot_positions(position_ids, slots, before=position_ids[:, :1])
        return torch.cat((old, new_key_positions(position_ids)), dim=1)
    return slot_positions(position_ids, slots)


def position_bias(query_pos: Tensor, key_pos: Tensor, window: int) -> Tensor:
    """Additive fp32 bias [B, 1, S, K]: 0 where a query at `query_pos [B, S]` may see a key at `key_pos [B, K]`.

    Causal (`key <= query`) and, for `window > 0`, `key > query - window` (HF's sliding window).
    INVALID keys are never seen; a padding query (negative position) sees nothing and stays finite.
    """
    q = query_pos[:, None, :, None]
    k = key_pos[:, None, None, :]
    allowed = k <= q
    if window > 0:
        allowed = allowed & (k > q - window)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


def onnx_kv_write():  # type: ignore[no-untyped-def]
    """The ONNX translation of `g2trt::kv_write` for torch.onnx.export's custom_translation_table."""
    from onnxscript.values import Opset

    op24 = Opset("", 24)

    def translation(cache, update, write_index):  # type: ignore[no-untyped-def]
        return op24.TensorScatter(cache, update, write_index, axis=2, mode="circular")

    return {torch.ops.g2trt.kv_write.default: translation}


__all__ = ["INVALID", "key_positions", "kv_write", "new_key_positions", "position_bias", "slot_positions", "write"]

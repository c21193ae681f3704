"""Recognise the exported rotary embedding, so the `ort` target can run it as com.microsoft.RotaryEmbedding
on the packed [B, S, N*Dh] projection instead of transposing to [B, N, S, Dh] and back.

    linear [B,S,N*Dh] ─ Reshape [B,S,N,Dh] ─ Transpose(0,2,1,3) ─> xt
    out = xt * cos + Concat(-xt[..., Dh/2:], xt[..., :Dh/2]) * sin           (rotate_half)
    cos = [Cast] Cos(Unsqueeze(Concat(f, f), 1)),  f = Cast(Unsqueeze(position_ids, -1)) * inv_freq   (sin alike)

The cos/sin tables RotaryEmbedding indexes are `cos(p * inv_freq)` for p < max_position_embeddings,
computed like the graph computes them (fp32, then cast to the activation dtype).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from export import io_contract as io
from graph_passes.match import Reject, const_array, dtype_of, ints, maybe_producer, other_input, producer


@dataclasses.dataclass(frozen=True)
class Rope:
    linear: gs.Tensor  # [B, S, N*Dh]
    position_ids: gs.Tensor
    inv_freq: np.ndarray  # [Dh/2] fp32
    dtype: np.dtype  # dtype of the rotation (the activations')


def match(q: gs.Tensor, heads: int, head_dim: int) -> Rope:
    add = producer(q, "Add")
    muls = [producer(t, "Mul") for t in add.inputs]
    rot_side = [m for m in muls if any(maybe_producer(i, "Concat") for i in m.inputs)]
    if len(rot_side) != 1:
        raise Reject(f"{add.name} is not x*cos + rotate_half(x)*sin")
    sin_mul = rot_side[0]
    cos_mul = muls[1] if muls[0] is sin_mul else muls[0]
    rot = next(i for i in sin_mul.inputs if maybe_producer(i, "Concat"))
    sin = other_input(sin_mul, rot)
    cat = producer(rot, "Concat")
    if len(cat.inputs) != 2 or int(cat.attrs.get("axis", 0)) not in (-1, 3):
        raise Reject(f"{cat.name} is not rotate_half's Concat on the last axis")
    neg = producer(cat.inputs[0], "Neg")
    split = producer(neg.inputs[0], "Split")
    if cat.inputs[1] is not split.outputs[0] or neg.inputs[0] is not split.outputs[1] or len(split.outputs) != 2:
        raise Reject(f"{cat.name} is not Concat(-x2, x1) of one Split")
    if int(split.attrs.get("axis", 0)) not in (-1, 3):
        raise Reject(f"{split.name} does not split the head dim")
    if len(split.inputs) > 1 and split.inputs[1].name:
        sizes = ints(split.inputs[1], "split sizes")
        if sizes[0] != sizes[1]:
            raise Reject(f"{split.name} splits unevenly {sizes}")
    xt = split.inputs[0]
    if not any(i is xt for i in cos_mul.inputs):
        raise Reject(f"{cos_mul.name} does not multiply the same x by cos")
    cos = other_input(cos_mul, xt)
    tr = producer(xt, "Transpose")
    if list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise Reject(f"{tr.name} is not the heads transpose")
    reshape = producer(tr.inputs[0], "Reshape")
    out_shape = reshape.outputs[0].shape
    if out_shape is None or len(out_shape) != 4 or out_shape[2:] != [heads, head_dim]:
        raise Reject(f"{reshape.name} does not split into [{heads}, {head_dim}] heads")
    linear = reshape.inputs[0]
    cos_f, pos, inv = _table_source(cos, "Cos")
    sin_f, pos2, inv2 = _table_source(sin, "Sin")
    if cos_f is not sin_f or pos is not pos2 or not np.array_equal(inv, inv2):
        raise Reject("cos and sin come from different frequencies")
    if pos.name != io.POSITION_IDS:
        raise Reject(f"rotary positions come from {pos.name}, not {io.POSITION_IDS}")
    if inv.size * 2 != head_dim:
        raise Reject(f"inv_freq has {inv.size} entries for head_dim {head_dim}")
    return Rope(linear, pos, inv.astype(np.float32), dtype_of(q) or np.dtype(np.float32))


def _table_source(t: gs.Tensor, op: str) -> tuple[gs.Tensor, gs.Tensor, np.ndarray]:
    """(freqs, position_ids, inv_freq) behind `[Cast] op(Unsqueeze(Concat(f, f)))`."""
    cast = maybe_producer(t, "Cast")
    fn = producer(cast.inputs[0] if cast is not None else t, op)
    unsq = producer(fn.inputs[0], "Unsqueeze")
    cat = producer(unsq.inputs[0], "Concat")
    if len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        raise Reject(f"{cat.name} is not cat(freqs, freqs)")
    freqs = cat.inputs[0]
    mul = producer(freqs, "Mul")
    inv = next((const_array(i) for i in mul.inputs if const_array(i) is not None), None)
    if inv is None:
        raise Reject(f"{mul.name} has no constant inv_freq")
    pos_f = next(i for i in mul.inputs if const_array(i) is None)
    pos_cast = producer(pos_f, "Cast")
    pos_unsq = producer(pos_cast.inputs[0], "Unsqueeze")
    return freqs, pos_unsq.inputs[0], np.asarray(inv).reshape(-1)


def tables(inv_freq: np.ndarray, max_positions: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, Dh/2]: fp32 `position * inv_freq` as the graph computes it, then cast."""
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)

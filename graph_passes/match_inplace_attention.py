"""The in-place KV cache's attention core (export.model.Attention.forward_inplace), matched from its scores.

    past_key ─ TensorScatter(Slice(key), write_index) ─> present_key ─ Transpose(0,1,3,2) ─┐
    query ─ Reshape [B, KV, R*S, Dh] ─────────────────────────────────────────────── MatMul ─┐
    key ─ Transpose(0,1,3,2) ──────────────── MatMul(same grouped query)  (sliding layers only)┤
                                                          Concat(-1)  (sliding layers only) ─┘
      ─ Reshape [B, H, S, T] ─ [Cast f32] ─ Mul(scale) ─ [soft-cap] ─ Add(bias) ─ Softmax ─ [Cast]
      ─ Reshape [B, KV, R*S, T] ─ global:  MatMul(present_value)
                                  sliding: Slice ─ MatMul(present_value) ┐
                                           Slice ─ MatMul(value) ────────┴ Add
      ─ Reshape [B, H, S, Dh] ─> out
    bias = Where(key position <= query position [& > query - window], 0, min)   (from position_ids)

    ─>  SlidingWindowAttentionInplace(query, key, value, past_key, past_value, position_ids)
            -> (out, present_key, present_value)

Called by insert_sliding_window_attention once the scores' chain (soft-cap, scale) is walked: the
in-place form starts where the dynamic one has its MatMul, at the Reshape of grouped scores.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from export import io_contract as io
from graph_passes.match import Reject, only_consumer, producer


def scores_blocks(scores: gs.Tensor) -> tuple[gs.Node, list[gs.Node], gs.Node | None]:
    """(the [B, H, S, T] Reshape, the score MatMuls per key block, the Concat joining them if any)."""
    view = producer(scores, "Reshape")
    src = producer(view.inputs[0], "Concat", "MatMul")
    if src.op == "MatMul":
        return view, [src], None
    if int(src.attrs.get("axis", 0)) not in (-1, 3) or len(src.inputs) != 2:
        raise Reject(f"{src.name} is not the Concat(-1) of two score blocks")
    return view, [producer(t, "MatMul") for t in src.inputs], src


def key_block(mm: gs.Node) -> tuple[gs.Tensor, gs.Tensor, gs.Node]:
    """(grouped query, the keys the block reads, the key Transpose) of one score MatMul."""
    qg, kt = mm.inputs
    tr = producer(kt, "Transpose")
    if list(tr.attrs.get("perm", [])) != [0, 1, 3, 2]:
        raise Reject(f"{tr.name} is not a key transpose (perm {tr.attrs.get('perm')})")
    return qg, tr.inputs[0], tr


def cache_write(present: gs.Tensor, kind: str) -> tuple[gs.Node, gs.Tensor, gs.Node | None]:
    """(the TensorScatter writing `present`, the new tokens it writes, the Slice taking its last n)."""
    scatter = producer(present, "TensorScatter")
    if int(scatter.attrs.get("axis", -2)) not in (2, -2) or len(scatter.inputs) != 3:
        raise Reject(f"{scatter.name} is not the {kind} cache write TensorScatter(past, new, index; axis=2)")
    update = scatter.inputs[1]
    sl = update.inputs[0] if update.inputs and update.inputs[0].op == "Slice" else None
    return scatter, (sl.inputs[0] if sl is not None else update), sl


def value_blocks(softmax: gs.Node, n_blocks: int) -> tuple[list[gs.Node], list[gs.Tensor], gs.Node, list[gs.Node]]:
    """Walk forward from the probabilities: (the value MatMuls, their value tensors, the output Reshape,
    every node passed on the way)."""
    probs = softmax.outputs[0]
    nodes: list[gs.Node] = []
    user = only_consumer(probs, "Cast", "Reshape")
    if user.op == "Cast":
        nodes.append(user)
        user = only_consumer(user.outputs[0], "Reshape")
    grouped = user
    nodes.append(grouped)
    if n_blocks == 1:
        mms = [only_consumer(grouped.outputs[0], "MatMul")]
    else:
        slices = list(grouped.outputs[0].outputs)
        if len(slices) != n_blocks or any(s.op != "Slice" for s in slices):
            raise Reject(f"{grouped.name} does not feed {n_blocks} Slices of the probabilities")
        nodes.extend(slices)
        mms = [only_consumer(s.outputs[0], "MatMul") for s in slices]
    passed = {id(n) for n in nodes}
    for mm in mms:
        left = mm.inputs[0]
        if not left.inputs or id(left.inputs[0]) not in passed:
            raise Reject(f"{mm.name} does not take the probabilities as its left operand")
    nodes.extend(mms)
    if n_blocks == 1:
        total = mms[0].outputs[0]
    else:
        add = only_consumer(mms[0].outputs[0], "Add")
        if {id(t) for t in add.inputs} != {id(m.outputs[0]) for m in mms}:
            raise Reject(f"{add.name} does not add the value blocks")
        nodes.append(add)
        total = add.outputs[0]
    out = only_consumer(total, "Reshape")
    nodes.append(out)
    return mms, [m.inputs[1] for m in mms], out, nodes


def match(scores: gs.Tensor, softmax: gs.Node) -> tuple[list[gs.Tensor], list[gs.Tensor], list[gs.Node], list[gs.Node]]:
    """(fused node inputs without position_ids, outputs, interior nodes, nodes to detach) of one site.

    `scores` is the raw [B, H, S, T] score tensor (before the cast and scale), `softmax` the anchor. The
    caller checks that the interior, with the score chain it walked, is private to the site.
    """
    view, mms, concat = scores_blocks(scores)
    blocks = [key_block(mm) for mm in mms]
    qg = blocks[0][0]
    if any(b[0] is not qg for b in blocks):
        raise Reject("the score blocks do not share one grouped query")
    query = producer(qg, "Reshape").inputs[0]
    present_k = blocks[0][1]
    scatter_k, key, slice_k = cache_write(present_k, "key")
    if len(blocks) == 2 and blocks[1][1] is not key:
        raise Reject(f"the second score block reads {blocks[1][1].name}, not this step's keys {key.name}")
    _, v_blocks, out_reshape, forward = value_blocks(softmax, len(blocks))
    present_v = v_blocks[0]
    scatter_v, value, slice_v = cache_write(present_v, "value")
    if len(v_blocks) == 2 and v_blocks[1] is not value:
        raise Reject(f"the second value block reads {v_blocks[1].name}, not this step's values {value.name}")
    if scatter_k.inputs[2] is not scatter_v.inputs[2]:
        raise Reject(f"{scatter_k.name} and {scatter_v.name} write at different indices")
    past_k, past_v = scatter_k.inputs[0], scatter_v.inputs[0]
    for past in (past_k, past_v):
        if not past.name.startswith("past_key_values."):
            raise Reject(f"{past.name} is not a cache input of the in-place contract")
    grouped = producer(qg, "Reshape")
    interior = [grouped, view, *mms, *(b[2] for b in blocks), *forward]
    if concat is not None:
        interior.append(concat)
    writes = [scatter_k, scatter_v, *(s for s in (slice_k, slice_v) if s is not None)]
    inputs = [query, key, value, past_k, past_v]
    outputs = [out_reshape.outputs[0], present_k, present_v]
    return inputs, outputs, [*interior, *writes], [out_reshape, scatter_k, scatter_v]


def position_input(g: gs.Graph) -> gs.Tensor:
    found = next((t for t in g.inputs if t.name == io.POSITION_IDS), None)
    if found is None:
        raise Reject(f"the graph has no {io.POSITION_IDS!r} input")
    return found


__all__ = ["match", "position_input"]

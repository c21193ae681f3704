"""The in-place KV cache contract (export/kv_cache.py): analytic goldens, the PyTorch model against the
dynamic contract and `transformers`, and the export in onnxruntime with past and present in one buffer.

Cases: batch 3 with left padding (three prompt lengths), a prompt longer than the sliding window in one
call, 64 decode steps so a ring of `window` slots wraps several times, chunked prefill, and buffers that
hold stale data from an earlier sequence. Bound: fp32 max |logit diff| <= 1e-5 between the two contracts
of the same PyTorch model (same math, one reduction order differs: ~4e-6 measured), <= 1e-4 against
transformers and against onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from deploy.runners.base import padded_positions
from deploy.runners.ort_runner import OrtInplaceRunner
from deploy.runners.torch_runner import TorchInplaceRunner
from deploy.verify.parity import position_ids
from export import io_contract as io
from export.config import preset
from export.errors import G2trtError
from export.kv_cache import INVALID, key_positions, position_bias, slot_positions
from export.onnx_export import ExportError, ExportOptions, export_onnx
from export.weights import RandomWeights, load_model
from tests.conftest import hf_model

CONTRACTS = 1e-5
BOUND = 1e-4
LENGTHS = (25, 22, 5)  # tiny's window is 16: the longest prompt slides within one call
STEPS = 64


def test_slot_positions_golden() -> None:
    # a ring of 4 slots; row 0 last wrote position 9 (slots hold 8, 9, 6, 7), row 1 position 1 (0, 1, -, -)
    pos = torch.tensor([[9], [1]])
    want = torch.tensor([[8, 9, 6, 7], [0, 1, INVALID, INVALID]])
    assert torch.equal(slot_positions(pos, 4), want)
    # only entries older than this step's first position (8): the ring's 8 and 9 are this step's own keys
    step = torch.tensor([[8, 9], [0, 1]])
    assert torch.equal(
        slot_positions(step, 4, before=step[:, :1]), torch.tensor([[INVALID] * 2 + [6, 7], [INVALID] * 4])
    )


def test_position_bias_golden() -> None:
    # a row padded by one token (position -1) then positions 0..2; window 2, keys = this step's own
    q = torch.tensor([[-1, 0, 1, 2]])
    keys = key_positions(q, 4, window=2)[:, 4:]  # the new-key block: padding is INVALID
    assert torch.equal(keys, torch.tensor([[INVALID, 0, 1, 2]]))
    allowed = position_bias(q, keys, 2)[0, 0] == 0
    want = torch.tensor(
        [
            [0, 0, 0, 0],  # the padding query sees nothing
            [0, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1],  # window 2: itself and one before
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, want)


def _prompts(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [3, 25], the dynamic contract's attention mask, and the in-place contract's positions."""
    rng = np.random.default_rng(seed)
    width = max(LENGTHS)
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (len(LENGTHS), width)))
    mask = torch.from_numpy((padded_positions(list(LENGTHS), width) >= 0).astype(np.int64))
    return ids, mask, torch.from_numpy(padded_positions(list(LENGTHS), width))


@pytest.fixture(scope="module")
def model():
    return load_model(RandomWeights(preset("tiny").replace(tie_word_embeddings=False), seed=1))


@pytest.mark.parametrize("ring", ["window", "window+3", "full"])
def test_inplace_equals_dynamic_contract(model, ring: str) -> None:
    cfg = model.config
    ids, mask, pos = _prompts(cfg)
    length = ids.shape[1] + STEPS
    slots = {"window": cfg.sliding_window, "window+3": cfg.sliding_window + 3, "full": length}[ring]
    cache = model.empty_cache(3, length, slots)
    pos_dyn = torch.from_numpy(position_ids(mask.numpy()))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        want, past = model(ids, mask, pos_dyn, model.empty_past(3))
        got, presents = model.forward_inplace(ids, pos, cache)
        assert all(p[0] is c[0] and p[1] is c[1] for p, c in zip(presents, cache, strict=True))  # written in place
        worst = (want - got)[mask.bool()].abs().max().item()
        for _ in range(STEPS):
            tok = torch.from_numpy(rng.integers(0, cfg.vocab_size, (3, 1)))
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1)
            pos_dyn, pos = pos_dyn[:, -1:] + 1, pos[:, -1:] + 1
            want, past = model(tok, mask, pos_dyn, past)
            got, _ = model.forward_inplace(tok, pos, cache)
            worst = max(worst, (want - got).abs().max().item())
    assert worst <= CONTRACTS, worst


def test_inplace_matches_transformers() -> None:
    cfg = preset("tiny")
    hf = hf_model(cfg, seed=3, scale=4.0)  # scale 4: both soft-caps are active
    ours = load_model(RandomWeights(cfg, seed=3, scale=4.0))
    ids, mask, pos = _prompts(cfg, seed=3)
    cache = ours.empty_cache(3, ids.shape[1] + 4, cfg.sliding_window)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=torch.from_numpy(position_ids(mask.numpy())))
        got, _ = ours.forward_inplace(ids, pos, cache)
        worst = (ref.logits - got)[mask.bool()].abs().max().item()
        hf_cache, hf_pos = ref.past_key_values, torch.from_numpy(position_ids(mask.numpy()))
        for step in range(3):
            tok = torch.tensor([[7 + step]] * 3)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1)
            hf_pos, pos = hf_pos[:, -1:] + 1, pos[:, -1:] + 1
            ref = hf(input_ids=tok, attention_mask=mask, position_ids=hf_pos, past_key_values=hf_cache, use_cache=True)
            got, _ = ours.forward_inplace(tok, pos, cache)
            worst = max(worst, (ref.logits - got).abs().max().item())
    assert got.abs().max() > 20  # the final soft-cap (30) is in play
    assert worst <= BOUND, worst


def test_chunked_prefill_and_stale_buffers(model) -> None:
    """Chunks of 4 on a ring of window + 3 slots, into buffers full of an earlier sequence's data."""
    cfg = model.config
    ids, _, pos = _prompts(cfg)
    length, chunk = ids.shape[1] + 8, 4
    fresh = model.empty_cache(3, length, cfg.sliding_window)
    stale = model.empty_cache(3, length, cfg.sliding_window + chunk - 1)
    for k, v in stale:
        k.normal_(), v.normal_()
    with torch.no_grad():
        want, _ = model.forward_inplace(ids, pos, fresh)
        for start in range(0, ids.shape[1], chunk):
            got, _ = model.forward_inplace(ids[:, start : start + chunk], pos[:, start : start + chunk], stale)
        assert (want[:, -1] - got[:, -1]).abs().max().item() <= CONTRACTS
        for step in range(8):
            tok, pos = torch.tensor([[11 + step]] * 3), pos[:, -1:] + 1
            want, _ = model.forward_inplace(tok, pos, fresh)
            got, _ = model.forward_inplace(tok, pos, stale)
            assert (want - got).abs().max().item() <= CONTRACTS


@pytest.fixture(scope="module")
def inplace_export(tmp_path_factory):
    cfg = preset("tiny").replace(tie_word_embeddings=False)
    return export_onnx(
        RandomWeights(cfg, seed=1), tmp_path_factory.mktemp("inplace"), ExportOptions(kv_cache="inplace")
    )


def test_inplace_export_contract(inplace_export) -> None:
    cfg = preset("tiny").replace(tie_word_embeddings=False)
    onnx.checker.check_model(str(inplace_export.model_path), full_check=True)
    proto = onnx.load(str(inplace_export.model_path), load_external_data=False)
    assert [i.name for i in proto.graph.input] == io.input_names(cfg, "inplace")
    assert [o.name for o in proto.graph.output] == io.output_names(cfg)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims["past_key_values.0.key"] == [io.BATCH, 2, io.SLIDING_CACHE, 32]  # layer 0 slides
    assert dims["past_key_values.1.key"] == [io.BATCH, 2, io.CACHE, 32]
    writes = [n for n in proto.graph.node if n.op_type == "TensorScatter"]
    assert len(writes) == 2 * cfg.num_hidden_layers  # one in-place write per cache tensor
    assert {i.name for n in writes for i in proto.graph.input if i.name == n.input[0]} == set(io.past_names(cfg))
    # past feeds only its write (Shape reads no data): nothing reads a buffer before it is written
    readers = {
        name: [n.op_type for n in proto.graph.node if name in n.input and n.op_type != "Shape"]
        for name in io.past_names(cfg)
    }
    assert all(r == ["TensorScatter"] for r in readers.values()), readers
    assert inplace_export.manifest["options"]["kv_cache"] == "inplace" and inplace_export.manifest["opset"] == 24


def test_inplace_export_needs_opset_24() -> None:
    with pytest.raises(ExportError, match="opset >= 24"):
        ExportOptions(kv_cache="inplace", opset=18)
    with pytest.raises(ExportError, match="--kv-cache"):
        ExportOptions(kv_cache="paged")  # type: ignore[arg-type]


def test_onnxruntime_writes_the_shared_buffer_in_place(inplace_export, model, capfd) -> None:
    """Past and present bound to one buffer: logits match PyTorch over 64 steps, and the buffer is the output."""
    cfg = model.config
    ort_runner = OrtInplaceRunner(inplace_export.model_path, cfg)
    torch_runner = TorchInplaceRunner(model)
    ids, _, pos = _prompts(cfg)
    ids, pos = ids.numpy(), pos.numpy()
    length = ids.shape[1] + STEPS
    a, b = ort_runner.allocate(3, length, cfg.sliding_window), torch_runner.allocate(3, length, cfg.sliding_window)
    worst = np.abs(ort_runner.step(ids, pos, a) - torch_runner.step(ids, pos, b))[pos >= 0].max()
    rng = np.random.default_rng(2)
    for _ in range(STEPS):
        tok, pos = rng.integers(0, cfg.vocab_size, (3, 1)), pos[:, -1:] + 1
        worst = max(worst, np.abs(ort_runner.step(tok, pos, a) - torch_runner.step(tok, pos, b)).max())
    assert worst <= BOUND, worst
    pairs = [(x, y) for xs, ys in zip(a.buffers, b.buffers, strict=True) for x, y in zip(xs, ys, strict=True)]
    assert max(np.abs(x - y).max() for x, y in pairs) <= BOUND  # the caches themselves agree
    binding = next(iter(ort_runner._bindings.values())).io  # the decode step's binding
    outputs = dict(zip([o.name for o in ort_runner.session.get_outputs()], binding.get_outputs(), strict=True))
    for i, (k, v) in enumerate(a.buffers):
        assert outputs[io.present_name(i, "key")].data_ptr() == k.ctypes.data
        assert outputs[io.present_name(i, "value")].data_ptr() == v.ctypes.data
    assert "in-place optimization not activated" not in capfd.readouterr().err  # onnxruntime copied no cache


def test_contract_mismatch_is_one_line(inplace_export, tiny_export) -> None:
    from deploy.runners.ort_runner import OrtRunner

    cfg = preset("tiny").replace(tie_word_embeddings=False)
    with pytest.raises(G2trtError, match="inplace KV cache contract, given to a runner of the dynamic"):
        OrtRunner(inplace_export.model_path, cfg)
    with pytest.raises(G2trtError, match="dynamic KV cache contract, given to a runner of the inplace"):
        OrtInplaceRunner(tiny_export("fp32").model_path, preset("tiny"))


def test_steps_that_do_not_fit_the_cache_are_refused(inplace_export) -> None:
    cfg = preset("tiny").replace(tie_word_embeddings=False)
    runner = OrtInplaceRunner(inplace_export.model_path, cfg)
    cache = runner.allocate(1, 8)
    with pytest.raises(G2trtError, match="position 8 does not fit a KV cache of 8 slots"):
        runner.step(np.zeros((1, 9), np.int64), np.arange(9)[None], cache)
    ring = runner.allocate(1, 64, cfg.sliding_window)
    runner.step(np.zeros((1, 4), np.int64), np.arange(4)[None], ring)
    with pytest.raises(G2trtError, match="needs a sliding ring of window \\+ 3"):
        runner.step(np.zeros((1, 4), np.int64), np.arange(4, 8)[None], ring)

"""The PyTorch Gemma 2 against analytic goldens and against `transformers.Gemma2ForCausalLM` (eager).

Bound: fp32 max |logit diff| <= 1e-4 on valid (non-padded) positions, prefill and 3 decode steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.verify.parity import position_ids
from export.config import GLOBAL, SLIDING, Gemma2Config, preset
from export.model import Gemma2ForCausalLM, attention_bias, rms_normalize, sliding_mask, softcap
from export.weights import RandomWeights, load_model
from tests.conftest import hf_model

BOUND = 1e-4


def test_sliding_mask_6x6_golden() -> None:
    # window 3: each query sees itself and the 2 keys before it
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sliding_mask(6, 6, 3), want)
    assert torch.equal(sliding_mask(6, 6, 0), torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    # decode: 1 query at position 5 of 6 keys
    assert torch.equal(sliding_mask(1, 6, 3), want[5:])


def test_attention_bias_uses_the_last_columns_of_the_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    full = attention_bias(mask, 2, 6, 0)
    trimmed = attention_bias(mask, 2, 3, 0)  # a sliding layer holding only 1 past entry
    assert full.shape == (1, 1, 2, 6) and trimmed.shape == (1, 1, 2, 3)
    assert torch.equal(full[..., 3:], trimmed)
    assert (full[..., :2] < -1e30).all()  # padding is masked


def test_softcap_values() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, 1e4, -1e4])
    y = softcap(x, 50.0)
    assert torch.allclose(y[:3], 50 * torch.tanh(x[:3] / 50))
    assert y[3] == pytest.approx(50.0) and y[4] == pytest.approx(-50.0)


def test_layer_zero_is_sliding_and_27b_scale() -> None:
    for name in ("2b", "9b", "27b"):
        cfg = preset(name)
        assert cfg.layer_types[0] == SLIDING and cfg.layer_types[1] == GLOBAL
        assert cfg.windows[0] == 4096 and cfg.windows[1] == 0
    assert preset("27b").attn_scale == pytest.approx(144**-0.5)
    assert preset("27b").head_dim == 128  # so head_dim ** -0.5 would be wrong


def _compare_with_hf(cfg: Gemma2Config, seq: int, seed: int = 0, scale: float = 1.0) -> tuple[float, float]:
    hf = hf_model(cfg, seed, scale)
    ours = load_model(RandomWeights(cfg, seed=seed, scale=scale))
    rng = np.random.default_rng(seed)
    mask = np.ones((2, seq), dtype=np.int64)
    mask[1, :3] = 0  # left padding
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (2, seq)))
    am = torch.from_numpy(mask)
    pos = torch.from_numpy(position_ids(mask))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
        logits, past = ours(ids, am, pos, ours.empty_past(2))
        prefill = (ref.logits - logits)[am.bool()].abs().max().item()
        cache, decode = ref.past_key_values, 0.0
        for _ in range(3):
            ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (2, 1)))
            am = torch.cat([am, torch.ones(2, 1, dtype=torch.int64)], 1)
            pos = pos[:, -1:] + 1
            ref = hf(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True)
            logits, past = ours(ids, am, pos, past)
            cache = ref.past_key_values
            decode = max(decode, (ref.logits - logits).abs().max().item())
    return prefill, decode


@st.composite
def configs(draw: st.DrawFn) -> Gemma2Config:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 24, 32]))
    layers = draw(st.integers(1, 4))
    return preset("tiny").replace(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_size=draw(st.sampled_from([32, 48, 64])),
        intermediate_size=draw(st.sampled_from([64, 96])),
        query_pre_attn_scalar=draw(st.sampled_from([head_dim, 144])),
        sliding_window=draw(st.integers(2, 12)),
        vocab_size=257,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), extra=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_parity_with_transformers_on_random_configs(cfg: Gemma2Config, extra: int, seed: int) -> None:
    # The prompt is always longer than the window, so sliding layers really slide during prefill and decode.
    prefill, decode = _compare_with_hf(cfg, cfg.sliding_window + extra, seed)
    assert prefill <= BOUND and decode <= BOUND, (prefill, decode)


def test_parity_with_transformers_tiny_with_active_softcaps() -> None:
    # scale 4: attention logits reach the 50 cap and final logits the 30 cap, so soft-capping is exercised.
    cfg = preset("tiny")
    prefill, decode = _compare_with_hf(cfg, cfg.sliding_window + 9, scale=4.0)
    assert prefill <= BOUND and decode <= BOUND, (prefill, decode)
    model = load_model(RandomWeights(cfg, scale=4.0))
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    logits, _ = model(ids, torch.ones(1, 8, dtype=torch.int64), torch.arange(8)[None], model.empty_past(1))
    assert logits.abs().max() > 20  # the final cap (30) is in play


def test_parity_with_transformers_when_query_pre_attn_scalar_is_not_head_dim() -> None:
    # 27B's case (144 vs head_dim 128): the score scale must come from query_pre_attn_scalar.
    cfg = preset("tiny").replace(query_pre_attn_scalar=144)
    assert cfg.attn_scale != cfg.head_dim**-0.5
    prefill, decode = _compare_with_hf(cfg, cfg.sliding_window + 5, scale=2.0)
    assert prefill <= BOUND and decode <= BOUND, (prefill, decode)


def test_rmsnorm_scales_by_one_plus_weight_as_transformers_does() -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from export.model import RMSNorm

    x = torch.randn(2, 5, 64) * 3
    ours, theirs = RMSNorm(64, 1e-6), Gemma2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(64) * 0.5  # Gemma stores w and scales by (1 + w); w = 0 is the identity
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(ours(x), rms_normalize(x, 1e-6) * w)  # scaling by w alone would differ


def test_trimmed_sliding_cache_matches_full_cache() -> None:
    cfg = preset("tiny")
    model = load_model(RandomWeights(cfg))
    w = cfg.sliding_window
    ids = torch.randint(0, cfg.vocab_size, (2, w + 7))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    pos = torch.from_numpy(position_ids(am.numpy()))
    _, past = model(ids, am, pos, model.empty_past(2))
    trimmed = [
        (k[:, :, -(w - 1) :], v[:, :, -(w - 1) :]) if t == SLIDING else (k, v)
        for (k, v), t in zip(past, cfg.layer_types, strict=True)
    ]
    step = torch.randint(0, cfg.vocab_size, (2, 1))
    am = torch.cat([am, torch.ones(2, 1, dtype=torch.int64)], 1)
    full, _ = model(step, am, pos[:, -1:] + 1, past)
    short, _ = model(step, am, pos[:, -1:] + 1, trimmed)
    assert torch.equal(full, short)


def test_last_logits_only_equals_the_last_row() -> None:
    cfg = preset("tiny")
    src = RandomWeights(cfg)
    full, last = load_model(src), load_model(src, last_logits_only=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    am, pos = torch.ones_like(ids), torch.arange(9).expand(2, 9)
    a, _ = full(ids, am, pos, full.empty_past(2))
    b, _ = last(ids, am, pos, last.empty_past(2))
    assert b.shape == (2, 1, cfg.vocab_size)
    assert (a[:, -1:] - b).abs().max() <= 1e-5  # same math; BLAS may block a 1-row matmul differently


def test_meta_build_has_no_weights() -> None:
    with torch.device("meta"):
        model = Gemma2ForCausalLM(preset("27b"))
    assert all(p.is_meta for p in model.parameters())


# 9B's width and heads, two layers (sliding, global), a small vocab: sqrt(3584) = 59.87 is not exact in fp16
# (59.875) or bf16 (59.75), so HF's rounding of the embedding scale to the weight dtype shows; 2B's
# sqrt(2304) = 48 is exact in every dtype and would hide it, as tiny's sqrt(64) does.
REAL_WIDTH = preset("9b").replace(num_hidden_layers=2, vocab_size=512, intermediate_size=512)
# max |Δlogit| / max |logit| vs transformers run in the same dtype, prefill with left padding. Measured
# (torch 2.13 CPU): fp16 0.0152 / 22.1 = 6.9e-4, bf16 0.101 / 22.0 = 4.6e-3; bounds ~3x and ~2x that.
HALF_REL_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_parity_with_transformers_at_a_real_width(dtype: torch.dtype) -> None:
    cfg = REAL_WIDTH
    assert float(torch.tensor(cfg.embed_scale, dtype=dtype)) != cfg.embed_scale  # the premise
    hf, ours = hf_model(cfg, dtype=dtype), load_model(RandomWeights(cfg), dtype)
    seen: dict[str, torch.Tensor] = {}
    ours.model.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("ours", a[0]))
    hf.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("hf", a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    pos = torch.from_numpy(position_ids(am.numpy()))
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()
        got, _ = ours(ids, am, pos, ours.empty_past(2))
    # The scaled embeddings entering layer 0 are HF's bit for bit (fp16 residuals are kept in fp32 here:
    # the product of two fp16 values is exact in fp32, so rounding it back must give HF's fp16 product).
    assert torch.equal(seen["ours"].to(dtype), seen["hf"])
    valid = am.bool()
    rel = (got - want)[valid].abs().max() / want[valid].abs().max()
    assert rel <= HALF_REL_BOUND[dtype], rel

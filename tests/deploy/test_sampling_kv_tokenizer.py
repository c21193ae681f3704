"""Units under generation: the sampler's filters, the KV cache policy's arithmetic, the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.generate import kv_cache
from deploy.generate.sampling import SamplingConfig, filtered_probs, next_tokens
from deploy.generate.tokenizer import TokenizerError, find_tokenizer, load_tokenizer, write_id_tokenizer
from export.config import preset
from export.errors import G2trtError

LOGITS = np.log(np.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))


def test_top_k_keeps_the_k_most_likely():
    p = filtered_probs(LOGITS, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p[0], [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(p[1], [0, 0, 3 / 7, 4 / 7])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = filtered_probs(LOGITS, SamplingConfig(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p[0], [0.5 / 0.75, 0.25 / 0.75, 0, 0])  # 0.5 < 0.7 <= 0.75
    np.testing.assert_allclose(p[1], [0, 0, 3 / 7, 4 / 7])


def test_temperature_sharpens_and_flattens():
    cold = filtered_probs(LOGITS, SamplingConfig(temperature=0.1))
    hot = filtered_probs(LOGITS, SamplingConfig(temperature=10.0))
    assert cold[0, 0] > 0.99 and hot[0].max() - hot[0].min() < 0.1


def test_sampled_frequencies_follow_the_filtered_distribution():
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    rng = np.random.default_rng(0)
    draws = np.concatenate([next_tokens(np.repeat(LOGITS[:1], 1000, 0), cfg, rng) for _ in range(10)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=0.02)


def test_greedy_is_argmax_and_ignores_the_generator():
    assert next_tokens(LOGITS, SamplingConfig(), np.random.default_rng(1)).tolist() == [0, 3]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top-k"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_p": 1.5}, "top-p"),
    ],
)
def test_bad_sampling_settings(kw, match):
    with pytest.raises(G2trtError, match=match):
        SamplingConfig(**kw)


def test_retain_trims_only_sliding_layers():
    cfg = preset("tiny")  # window 16; layers 0, 2 sliding
    past = [(np.zeros((2, 2, 40, 32), np.float32),) * 2 for _ in range(cfg.num_hidden_layers)]
    kept = kv_cache.retain(cfg, past, "window")
    assert [k.shape[2] for k, _ in kept] == [15, 40, 15, 40]
    assert all(k.flags.c_contiguous for k, _ in kept)
    assert (
        kv_cache.retain(cfg, past, "full") is not past
        and [k.shape[2] for k, _ in kv_cache.retain(cfg, past, "full")] == [40] * 4
    )


def test_retain_keeps_the_newest_entries():
    cfg = preset("tiny")
    k = np.arange(40, dtype=np.float32).reshape(1, 1, 40, 1).repeat(32, -1)
    kept = kv_cache.retain(cfg, [(k, k)] * cfg.num_hidden_layers, "window")
    assert kept[0][0][0, 0, :, 0].tolist() == list(range(25, 40))


def test_expected_bytes_at_prompt_2048_window_128():
    cfg = preset("tiny").replace(sliding_window=128, max_position_embeddings=4096)
    per_token = 2 * 2 * 32 * 4  # key + value, 2 kv heads, head_dim 32, fp32
    full = kv_cache.expected_bytes(cfg, 1, 2048, "full", 4)
    window = kv_cache.expected_bytes(cfg, 1, 2048, "window", 4)
    assert full == 4 * 2048 * per_token
    assert window == 2 * 2048 * per_token + 2 * 127 * per_token


def test_unknown_policy():
    with pytest.raises(G2trtError, match="unknown KV cache policy 'ring'"):
        kv_cache.check_policy("ring")


def test_id_tokenizer_round_trip(tmp_path):
    cfg = preset("tiny")
    path = write_id_tokenizer(cfg, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert find_tokenizer(tmp_path) == path and tok.vocab_size == cfg.vocab_size
    ids = tok.encode("t5 t900 t17")
    assert ids == [cfg.bos_token_id, 5, 900, 17]
    assert tok.decode(ids) == "t5 t900 t17"
    assert tok.decode([cfg.eos_token_id[0], 7]) == "t7"  # special tokens are skipped


def test_missing_and_broken_tokenizers(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    assert find_tokenizer(None, tmp_path / "empty", tmp_path / "empty" / "model.onnx") is None

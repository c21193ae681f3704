"""Generation across runners: greedy token identity, the windowed KV cache, padding, stop tokens, errors.

Cases are the ones that break ports: batch 2 with left padding, prompts longer than the sliding window
(16 on the tiny model), 32 new tokens (well past the window again).
"""

from __future__ import annotations

import numpy as np
import pytest

from deploy.generate import kv_cache
from deploy.generate.loop import GenerationConfig, GenerationError, generate, pad_left
from deploy.generate.sampling import SamplingConfig
from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.parity import position_ids
from export.weights import load_model

NEW = 32


@pytest.fixture(scope="module")
def prompts(runtime_cfg) -> list[list[int]]:
    rng = np.random.default_rng(7)
    w = runtime_cfg.sliding_window
    return [rng.integers(3, runtime_cfg.vocab_size, n).tolist() for n in (w + 24, w + 5)]


@pytest.fixture(scope="module")
def torch_runner(runtime_weights) -> TorchRunner:
    return TorchRunner(load_model(runtime_weights, "fp32"))


@pytest.fixture(scope="module")
def ort_plain(runtime_export, runtime_cfg) -> OrtRunner:
    return OrtRunner(runtime_export.model_path, runtime_cfg, name="ort-plain")


def greedy(runner, prompts, cache="window", **kw):
    return generate(runner, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=(), cache=cache, **kw))


@pytest.fixture(scope="module")
def reference(torch_runner, prompts):
    g = greedy(torch_runner, prompts, cache="full")
    # The comparison means something only if the tokens vary (a repeating model hides cache bugs).
    assert all(len(set(t)) >= 8 for t in g.tokens), g.tokens
    assert all(len(t) == NEW for t in g.tokens)
    return g


def test_prompts_are_padded_and_longer_than_the_window(prompts, runtime_cfg):
    _, mask = pad_left(prompts, runtime_cfg.pad_token_id)
    assert mask[1].sum() < mask.shape[1]  # row 1 is left-padded
    assert min(len(p) for p in prompts) > runtime_cfg.sliding_window


@pytest.mark.parametrize("cache", ["full", "window"])
def test_greedy_tokens_identical_torch_and_ort_plain(torch_runner, ort_plain, prompts, reference, cache):
    assert greedy(torch_runner, prompts, cache).tokens == reference.tokens
    assert greedy(ort_plain, prompts, cache).tokens == reference.tokens


@pytest.mark.parametrize("target", ["ort", "trt", "trt-native"])
def test_greedy_tokens_identical_on_graph_pass_targets(runtime_target, runtime_cfg, prompts, reference, target):
    """`ort` (com.microsoft GroupQueryAttention & co.), `trt` (g2trt plugin nodes run as their onnxruntime
    reference ops) and `trt-native` (plain ONNX for TensorRT's own importers), each with both caches."""
    runner = OrtRunner(runtime_target(target), runtime_cfg, name=target)
    for cache in ("window", "full"):
        assert greedy(runner, prompts, cache).tokens == reference.tokens, (target, cache)


def test_window_cache_matches_full_cache_logits(torch_runner, ort_plain, prompts, runtime_cfg):
    """Step by step, the trimmed cache gives the logits of the full cache (fp32 rounding only)."""
    for runner in (torch_runner, ort_plain):
        ids, mask = pad_left(prompts, runtime_cfg.pad_token_id)
        pos = position_ids(mask)
        full = window = runner.empty_past(2)
        rng = np.random.default_rng(0)
        for _ in range(20):
            a, full = runner.forward(ids, mask, pos, full)
            b, window = runner.forward(ids, mask, pos, window)
            window = kv_cache.retain(runtime_cfg, window, "window")
            np.testing.assert_allclose(b[:, -1], a[:, -1], atol=2e-5, rtol=0)
            ids = rng.integers(3, runtime_cfg.vocab_size, (2, 1))
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
        sliding = [i for i, t in enumerate(runtime_cfg.layer_types) if t == "sliding_attention"]
        assert all(window[i][0].shape[2] == runtime_cfg.sliding_window - 1 for i in sliding)
        assert all(full[i][0].shape[2] == mask.shape[1] - 1 for i in sliding)


def test_a_cache_one_entry_short_changes_the_logits(torch_runner, prompts, runtime_cfg):
    """The check above can fail: dropping one entry too many (window - 2) moves the logits."""
    ids, mask = pad_left(prompts, runtime_cfg.pad_token_id)
    logits, past = torch_runner.forward(ids, mask, position_ids(mask), torch_runner.empty_past(2))
    keep = runtime_cfg.sliding_window - 2
    short = [(k[:, :, -keep:], v[:, :, -keep:]) if i % 2 == 0 else (k, v) for i, (k, v) in enumerate(past)]
    good = kv_cache.retain(runtime_cfg, past, "window")
    nxt = logits[:, -1].argmax(-1)[:, None]
    mask2 = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    pos2 = position_ids(mask2)[:, -1:]
    a, _ = torch_runner.forward(nxt, mask2, pos2, good)
    b, _ = torch_runner.forward(nxt, mask2, pos2, short)
    assert np.abs(a - b).max() > 1e-3


def test_window_cache_holds_less_and_as_expected(torch_runner, prompts, reference, runtime_cfg):
    g = greedy(torch_runner, prompts, "window")
    total = max(len(p) for p in prompts) + NEW - 1  # the last token is never fed back
    assert reference.kv_bytes == kv_cache.expected_bytes(runtime_cfg, 2, total, "full", 4)
    assert g.kv_bytes == kv_cache.expected_bytes(runtime_cfg, 2, total, "window", 4)
    assert g.kv_bytes < reference.kv_bytes


def test_batch_with_padding_equals_each_prompt_alone(ort_plain, prompts, reference):
    for row, prompt in enumerate(prompts):
        assert greedy(ort_plain, [prompt]).tokens[0] == reference.tokens[row]


def test_stop_token_ends_its_row_only(ort_plain, prompts, reference):
    stop = reference.tokens[0][5]
    first = reference.tokens[0].index(stop)
    g = generate(ort_plain, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=(stop,)))
    assert g.tokens[0] == reference.tokens[0][: first + 1]
    assert g.finish[0] == "stop"
    if stop in reference.tokens[1]:
        assert g.tokens[1] == reference.tokens[1][: reference.tokens[1].index(stop) + 1]
    else:
        assert g.tokens[1] == reference.tokens[1] and g.finish[1] == "length"


def test_generation_stops_when_every_row_stopped(ort_plain, prompts, reference):
    stops = (reference.tokens[0][0], reference.tokens[1][0])
    g = generate(ort_plain, prompts, GenerationConfig(max_new_tokens=NEW, stop_tokens=stops))
    assert [len(t) for t in g.tokens] == [1, 1] and g.finish == ["stop", "stop"] and g.step_s == []


def test_sampling_is_deterministic_per_seed(ort_plain, prompts, reference):
    def sample(seed, **kw):
        cfg = GenerationConfig(max_new_tokens=12, stop_tokens=(), sampling=SamplingConfig(seed=seed, **kw))
        return generate(ort_plain, prompts, cfg).tokens

    hot = {"temperature": 1.5}
    assert sample(3, **hot) == sample(3, **hot)
    assert sample(3, **hot) != sample(4, **hot)
    greedy12 = [t[:12] for t in reference.tokens]
    assert sample(5, temperature=1.0, top_k=1) == greedy12  # top-k 1 is greedy whatever the seed
    assert sample(6, temperature=1.0, top_p=1e-6) == greedy12  # so is a vanishing nucleus


def test_runners_sample_the_same_tokens_with_a_seed(torch_runner, ort_plain, prompts):
    cfg = GenerationConfig(max_new_tokens=12, stop_tokens=(), sampling=SamplingConfig(0.8, 40, 0.9, seed=11))
    assert generate(torch_runner, prompts, cfg).tokens == generate(ort_plain, prompts, cfg).tokens


@pytest.mark.parametrize(
    ("prompts_", "new", "message"),
    [
        ([list(range(3, 1000))], 100, "exceeds the model's max_position_embeddings (1024)"),
        ([[5, 6], []], 4, "prompt 1 is empty"),
        ([[5, 5000]], 4, "token id 5000 is outside the vocabulary"),
        ([], 4, "no prompt given"),
        ([[5]], 0, "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_prompts_are_one_line_errors(ort_plain, prompts_, new, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        generate(ort_plain, prompts_, GenerationConfig(max_new_tokens=new))
    assert "\n" not in str(e.value)

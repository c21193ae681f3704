"""Text generation on any runner: batched, left-padded prompts, one prefill, then one decode step per token.

The loop is the one onnxruntime-genai and HF `generate` run: left padding with `attention_mask` 0,
positions that skip the padding, sampling from the last position's logits, rows that stop early keep
decoding pad tokens (their output is cut at the stop token) until every row stops or
`max_new_tokens` is reached. Between steps the KV cache follows a `CachePolicy` (`window` keeps each
sliding layer's last `sliding_window - 1` entries, see `deploy.generate.kv_cache`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from deploy.generate import kv_cache
from deploy.generate.sampling import SamplingConfig, next_tokens
from deploy.runners.base import Runner
from deploy.verify.parity import position_ids
from export.config import Gemma2Config
from export.errors import G2trtError


class GenerationError(G2trtError, ValueError):
    """Prompts or settings the model cannot generate from."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    stop_tokens: tuple[int, ...] | None = None  # None: the model's eos_token_id; () never stops early
    cache: kv_cache.CachePolicy = "window"


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, ending with the stop token when one was met
    finish: list[str]  # per prompt: "stop" or "length"
    prefill_s: float  # time to first token: prefill forward + choosing the first token
    step_s: list[float]  # each decode step (forward, sampling, cache update)
    kv_bytes: int  # bytes the KV cache holds after the last step
    kv_peak_bytes: int  # the most it held between steps

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput over all rows (prefill excluded); 0 when there was no decode step."""
        total = sum(self.step_s)
        return len(self.tokens) * len(self.step_s) / total if total > 0 else 0.0


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, longest] with each prompt right-aligned."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, longest - len(p) :] = p
            mask[row, longest - len(p) :] = 1
    return ids, mask


def check_prompts(cfg: Gemma2Config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompt given")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not len(p):
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        limit = cfg.max_position_embeddings
        if len(p) + max_new_tokens > limit:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds the model's "
                f"max_position_embeddings ({limit})"
            )


def generate(
    runner: Runner,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    on_step: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """Generate up to `config.max_new_tokens` for each prompt (token ids); `on_step` sees each new [B] row."""
    cfg = runner.config
    check_prompts(cfg, prompts, config.max_new_tokens)
    policy = kv_cache.check_policy(config.cache)
    stop = np.array(cfg.eos_token_id if config.stop_tokens is None else config.stop_tokens, dtype=np.int64)
    rng = np.random.default_rng(config.sampling.seed)
    batch = len(prompts)

    ids, mask = pad_left(prompts, cfg.pad_token_id)
    pos = position_ids(mask)
    past = runner.empty_past(batch)
    out = np.zeros((batch, 0), dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    step_s: list[float] = []
    kv_peak = 0
    start = time.perf_counter()
    for step in range(config.max_new_tokens):
        logits, presents = runner.forward(ids, mask, pos, past)
        new = next_tokens(logits[:, -1, :], config.sampling, rng)
        new = np.where(done, cfg.pad_token_id, new)
        past = kv_cache.retain(cfg, presents, policy)
        now = time.perf_counter()
        if step == 0:
            prefill_s = now - start
        else:
            step_s.append(now - start)
        start = now
        kv_peak = max(kv_peak, kv_cache.cache_bytes(past))
        out = np.concatenate([out, new[:, None]], axis=1)
        if on_step is not None:
            on_step(new)
        done |= np.isin(new, stop)
        if done.all():
            break
        ids = new[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1

    tokens, finish = [], []
    for row in out.tolist():
        hit = next((i for i, t in enumerate(row) if t in stop), None)
        tokens.append(row if hit is None else row[: hit + 1])
        finish.append("length" if hit is None else "stop")
    return Generation(tokens, finish, prefill_s, step_s, kv_cache.cache_bytes(past), kv_peak)

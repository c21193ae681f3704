"""Text generation on any runner: batched, left-padded prompts, one prefill, then one decode step per token.

The loop is the one onnxruntime-genai and HF `generate` run: left-padded prompts, sampling from the
last position's logits, rows that stop early keep decoding pad tokens (their output is cut at the stop
token) until every row stops or `max_new_tokens` is reached. Two KV cache contracts:

- in-place (`InplaceRunner`, the default of `g2trt generate`): the runner allocates the cache once for
  prompt + new tokens and every step writes it; padding is marked by negative positions. A long prompt
  is prefilled in chunks where the runner asks for it (`prefill_chunk`, `chunk_for`). A decode
  step is: write the new token and its position into two [B, 1] arrays, run, sample. Nothing is
  allocated or copied per token on the loop's side.
- dynamic (`Runner`): `attention_mask` 0 marks padding and the presents come back each step; between
  steps the cache follows a `CachePolicy` (`window` keeps each sliding layer's last
  `sliding_window - 1` entries, see `deploy.generate.kv_cache`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from deploy.generate import kv_cache
from deploy.generate.sampling import SamplingConfig, next_tokens
from deploy.runners.base import InplaceCache, InplaceRunner, Runner, padded_positions, runner_cache_sizes
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
    cache: kv_cache.CachePolicy = "window"  # dynamic contract only
    # in-place contract: prefill in chunks of this many tokens; "auto": in the runner's `prefill_chunk` when
    # the prompt is more than two of them long (`chunk_for`); None: at once
    prefill_chunk: int | Literal["auto"] | None = "auto"


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
    runner: Runner | InplaceRunner,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    on_step: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """Generate up to `config.max_new_tokens` for each prompt (token ids); `on_step` sees each new [B] row."""
    cfg = runner.config
    check_prompts(cfg, prompts, config.max_new_tokens)
    if runner.kv_cache == "inplace":
        return generate_inplace(runner, prompts, config, on_step)  # type: ignore[arg-type]
    assert runner.kv_cache == "dynamic"
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

    tokens, finish = _cut_at_stop(out.tolist(), stop)
    return Generation(tokens, finish, prefill_s, step_s, kv_cache.cache_bytes(past), kv_peak)


def generate_inplace(
    runner: InplaceRunner,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    on_step: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """`generate` on the in-place contract (prompts already checked by `generate`)."""
    cfg = runner.config
    batch, new_max = len(prompts), config.max_new_tokens
    stop = np.array(cfg.eos_token_id if config.stop_tokens is None else config.stop_tokens, dtype=np.int64)
    rng = np.random.default_rng(config.sampling.seed)
    ids, _ = pad_left(prompts, cfg.pad_token_id)
    width = ids.shape[1]
    pos = padded_positions([len(p) for p in prompts], width)
    chunk = chunk_for(runner, width, config.prefill_chunk)
    length, ring = runner_cache_sizes(runner, width + new_max, chunk or 1)  # a first prompt fits any ring
    cache = runner.allocate(batch, length, ring)

    out = np.zeros((batch, new_max), dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    step_ids = np.zeros((batch, 1), dtype=np.int64)
    step_pos = pos[:, -1:].copy()
    step_s: list[float] = []
    prefill_s = 0.0
    n = 0
    try:  # the runner forgets the cache after (its bindings would keep every generation's cache alive)
        start = time.perf_counter()
        logits = prefill(runner, ids, pos, cache, chunk)
        for n in range(1, new_max + 1):
            new = next_tokens(logits[:, -1, :], config.sampling, rng)
            if done.any():
                new[done] = cfg.pad_token_id
            out[:, n - 1] = new
            now = time.perf_counter()
            if n == 1:
                prefill_s = now - start
            else:
                step_s.append(now - start)
            start = now
            if on_step is not None:
                on_step(new)
            done |= (new[:, None] == stop).any(axis=1)  # np.isin costs ~10 us a call on these tiny arrays
            if n == new_max or done.all():
                break
            step_ids[:, 0] = new
            step_pos += 1
            logits = runner.step(step_ids, step_pos, cache)
    finally:
        runner.release(cache)

    tokens, finish = _cut_at_stop(out[:, :n].tolist(), stop)
    return Generation(tokens, finish, prefill_s, step_s, cache.nbytes, cache.nbytes)


def chunk_for(runner: InplaceRunner, width: int, setting: int | Literal["auto"] | None) -> int | None:
    """The chunk a prompt `width` tokens wide is prefilled in, None for at once. "auto": the runner's
    `prefill_chunk` for a prompt of more than two chunks (at two, chunking measured within the spread);
    a number: that many tokens; None: at once. The cache's ring must then hold `window + chunk - 1` slots."""
    chunk = runner.prefill_chunk if setting == "auto" else setting
    if chunk is not None and chunk < 1:
        raise GenerationError(f"--prefill-chunk must be >= 1, got {chunk}")
    if chunk is None or chunk >= width or (setting == "auto" and width <= 2 * chunk):
        return None
    return chunk


def prefill(
    runner: InplaceRunner, ids: np.ndarray, pos: np.ndarray, cache: InplaceCache, chunk: int | None
) -> np.ndarray:
    """The prompt through the runner, whole or in chunks (each continuing the sequence the last one wrote);
    the last chunk's logits."""
    width = ids.shape[1]
    if chunk is None or chunk >= width:
        return runner.step(ids, pos, cache)
    logits = None
    for start in range(0, width, chunk):
        logits = runner.step(ids[:, start : start + chunk], pos[:, start : start + chunk], cache)
    assert logits is not None
    return logits


def _cut_at_stop(rows: list[list[int]], stop: np.ndarray) -> tuple[list[list[int]], list[str]]:
    stops = set(stop.tolist())
    tokens, finish = [], []
    for row in rows:
        hit = next((i for i, t in enumerate(row) if t in stops), None)
        tokens.append(row if hit is None else row[: hit + 1])
        finish.append("length" if hit is None else "stop")
    return tokens, finish

"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.

The order is Hugging Face's (temperature, then top-k, then top-p), so a seed and settings mean the
same thing here as there. Sampling uses one `numpy.random.Generator` per generation: the same seed,
prompts and logits give the same tokens on every backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from export.errors import G2trtError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise G2trtError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise G2trtError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise G2trtError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of `logits [B, V]` (int64 [B])."""
    if config.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = filtered_probs(logits, config)
    u = rng.random((probs.shape[0], 1))
    choice = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)  # inverse CDF
    return np.minimum(choice, probs.shape[-1] - 1).astype(np.int64)


def filtered_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p, renormalized (float64 [B, V])."""
    x = logits.astype(np.float64) / config.temperature
    vocab = x.shape[-1]
    if 0 < config.top_k < vocab:
        kth = np.partition(x, vocab - config.top_k, axis=-1)[:, vocab - config.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    probs = _softmax(x)
    if config.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above
        drop_sorted = before >= config.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

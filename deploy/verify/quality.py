"""Teacher-forced quality of a lossy graph (quantized weights) against the fp32 PyTorch model.

Both runners read the same token sequence; at every position we compare the next-token distributions:
top-1 agreement (the argmax is the same token), mean KL(reference || candidate) in nats, and max / mean
|logit diff|. Max |logit diff| alone says little for quantized weights (it is never near 1e-4); agreement
and KL say whether the model still predicts what the fp32 model predicts.

Graphs that return logits for every position run the sequence as one prefill; last-logits-only graphs
(`--last-logits-only`, what generation runs) are fed one token per step through their own KV cache
(either contract: the caller's past, or the in-place buffers the runner allocates).
On random weights this is a weak signal: their next-token distributions are flat, so small logit
errors flip the argmax far more often than on a trained checkpoint, where the top token usually
leads by a margin. Quote numbers from a real checkpoint before relying on them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deploy.runners.base import InplaceRunner, Runner, runner_cache_sizes
from export.config import Gemma2Config

# Lowest teacher-forced top-1 agreement `g2trt verify` accepts per scheme. These catch a broken graph (a
# wrong scale, axis or transposed weight agrees on ~1/vocab of the positions), they are not quality
# claims: the random tiny model measures ~95 % (int8), ~85 % (fp8), ~55 % (int4), the 6-layer / 512-wide
# benchmark model 99.8 % / - / 97 % (benchmarks/quant/results.md).
AGREEMENT_BOUND = {"int8": 0.90, "fp8": 0.75, "int4": 0.40}


@dataclasses.dataclass(frozen=True)
class Quality:
    tokens: int
    top1_agreement: float
    mean_kl: float  # nats per position
    max_abs_diff: float
    mean_abs_diff: float

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def quality_ids(cfg: Gemma2Config, tokens: int = 512, seed: int = 0) -> np.ndarray:
    """A seeded token sequence [1, tokens] (ids above the special tokens)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, cfg.vocab_size, size=(1, tokens), dtype=np.int64)


def position_logits(runner: Runner | InplaceRunner, ids: np.ndarray, stepwise: bool) -> np.ndarray:
    """Logits [tokens, V] (fp64) predicting each next token, teacher-forced on `ids` [1, tokens]."""
    if runner.kv_cache == "inplace":
        return _inplace_logits(runner, ids, stepwise)
    n = ids.shape[1]
    if not stepwise:
        mask = np.ones_like(ids)
        logits, _ = runner.forward(ids, mask, np.arange(n, dtype=np.int64)[None], runner.empty_past(1))
        if logits.shape[1] == n:
            return logits[0].astype(np.float64)
    past = runner.empty_past(1)
    rows = []
    for t in range(n):
        mask = np.ones((1, t + 1), np.int64)
        logits, past = runner.forward(ids[:, t : t + 1], mask, np.array([[t]], np.int64), past)
        rows.append(logits[0, -1].astype(np.float64))
    return np.stack(rows)


def _inplace_logits(runner: InplaceRunner, ids: np.ndarray, stepwise: bool) -> np.ndarray:
    n = ids.shape[1]
    length, ring = runner_cache_sizes(runner, n)
    if not stepwise:
        cache = runner.allocate(1, length, ring)
        logits = runner.step(ids, np.arange(n, dtype=np.int64)[None], cache)[0].astype(np.float64)
        runner.release(cache)
        if logits.shape[0] == n:
            return logits
    cache = runner.allocate(1, length, ring)
    rows = []
    for t in range(n):  # astype copies: the runner reuses its logits array
        rows.append(runner.step(ids[:, t : t + 1], np.array([[t]], np.int64), cache)[0, -1].astype(np.float64))
    runner.release(cache)
    return np.stack(rows)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> Quality:
    """Quality of `got` against `ref`, both [tokens, V]."""
    log_p, log_q = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    diff = np.abs(got - ref)
    finite = bool(np.isfinite(diff).all())
    return Quality(
        tokens=ref.shape[0],
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        mean_kl=float(kl.mean()) if finite else float("inf"),
        max_abs_diff=float(diff.max()) if finite else float("inf"),
        mean_abs_diff=float(diff.mean()) if finite else float("inf"),
    )


def teacher_forced(
    reference: Runner | InplaceRunner, candidate: Runner | InplaceRunner, ids: np.ndarray, stepwise: bool
) -> Quality:
    return compare_logits(position_logits(reference, ids, stepwise), position_logits(candidate, ids, stepwise))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

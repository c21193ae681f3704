"""Numerical parity of one runner against another: prefill, then decode steps through each one's cache.

The cases are the ones that broke other Gemma 2 ports: batch 2 with left padding, and a prompt longer
than the sliding window (window + 9 tokens: 4105 for a real 4096 window, unless a caller caps it).
Logits are compared where the attention mask is 1 (padded query rows are undefined by contract). Both
runners are fed the same tokens; each keeps its own KV cache, so an error in a present output shows up
in the next step's logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deploy.runners.base import InplaceRunner, KVCache, Runner, padded_positions, runner_cache_sizes
from export.config import Gemma2Config


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] int64, left padding


@dataclasses.dataclass(frozen=True)
class StepDiff:
    case: str
    step: str  # "prefill" or "decode 1", ...
    max_abs_diff: float
    ref_max_abs: float


@dataclasses.dataclass(frozen=True)
class Report:
    reference: str
    candidate: str
    diffs: list[StepDiff]

    @property
    def prefill(self) -> float:
        return max((d.max_abs_diff for d in self.diffs if d.step == "prefill"), default=0.0)

    @property
    def decode(self) -> float:
        return max((d.max_abs_diff for d in self.diffs if d.step != "prefill"), default=0.0)

    @property
    def worst(self) -> float:
        return max(self.prefill, self.decode)

    @property
    def relative(self) -> float:
        """max over steps of max |Δlogit| / max |reference logit| (the scale half-precision error grows with)."""
        return max((d.max_abs_diff / max(d.ref_max_abs, 1e-30) for d in self.diffs), default=0.0)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A bound on max |Δlogit|: absolute, or relative to the reference's largest |logit| of the step."""

    value: float
    relative: bool = False

    def measure(self, report: Report) -> float:
        return report.relative if self.relative else report.worst

    def __str__(self) -> str:
        return f"{self.value:g}" + (" x max|logit|" if self.relative else "")


# Bounds against the fp32 PyTorch model, by export dtype. fp32: absolute, the 1e-4 (measured ~5e-6).
# fp16 / bf16: relative, because half-precision error grows with the logits. Measured on the tiny model
# with active soft-caps (weights x4: attention logits reach the 50 cap, final logits ~24 of 30; the tiny model
# at scale 1 has logits of ~4.7, where a soft-cap bug barely shows): fp16 8.5e-3 (ORT CPU), bf16 2.3e-2
# (onnx reference evaluator), so the bounds are ~1.8x those. At scale 1: fp16 1.9e-3, bf16 1.3e-2.
# Real checkpoints (26-46 layers) are not measured here.
TOLERANCE = {"fp32": Bound(1e-4), "fp16": Bound(1.5e-2, relative=True), "bf16": Bound(4e-2, relative=True)}


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding (as HF `generate` computes them)."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)


def parity_cases(cfg: Gemma2Config, seed: int = 0, max_len: int | None = None) -> list[Case]:
    """Batch 2 with 3 left-pad tokens: a short prompt, and one longer than the sliding window (window + 9
    tokens; `max_len` caps it, and a cap at or below the window no longer crosses it)."""
    rng = np.random.default_rng(seed)
    long_len = cfg.sliding_window + 9 if max_len is None else min(cfg.sliding_window + 9, max_len)
    cases = []
    for name, length in (("short", 11), ("longer than window", long_len)):
        ids = rng.integers(0, cfg.vocab_size, size=(2, length), dtype=np.int64)
        mask = np.ones((2, length), dtype=np.int64)
        mask[1, :3] = 0
        ids[1, :3] = cfg.pad_token_id
        cases.append(Case(name, ids, mask))
    return cases


def compare_inplace(
    reference: Runner, candidate: InplaceRunner, cases: list[Case], decode_steps: int = 3, seed: int = 1
) -> Report:
    """`compare` for a candidate of the in-place contract: the same tokens, its own cache, sized for the steps.

    The reference runs the dynamic contract (padding by attention_mask); the candidate gets the same
    tokens with padding marked by negative positions, and a cache of prompt + steps slots (a ring of
    `sliding_window` slots where it takes one), so its sliding layers wrap when the case is long.
    """
    rng = np.random.default_rng(seed)
    diffs: list[StepDiff] = []
    cfg = reference.config
    for case in cases:
        batch, width = case.input_ids.shape
        mask = case.attention_mask
        ids, pos = case.input_ids, position_ids(mask)
        lengths = mask.sum(axis=1)
        cpos = padded_positions(lengths.tolist(), width)
        past_r: KVCache = reference.empty_past(batch)
        length, ring = runner_cache_sizes(candidate, width + decode_steps)
        cache = candidate.allocate(batch, length, ring)
        for step in range(decode_steps + 1):
            ref, past_r = reference.forward(ids, mask, pos, past_r)
            got = np.array(candidate.step(ids, cpos, cache))  # a copy: a runner may reuse its output array
            valid = mask[:, -ref.shape[1] :].astype(bool)
            diffs.append(_diff(case.name, step, ref, got, valid))
            ids = rng.integers(0, cfg.vocab_size, size=(batch, 1), dtype=np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            pos, cpos = pos[:, -1:] + 1, cpos[:, -1:] + 1
        candidate.release(cache)  # its bindings would keep the case's cache (GPU memory for TensorRT)
    return Report(reference.name, candidate.name, diffs)


def _diff(case: str, step: int, ref: np.ndarray, got: np.ndarray, valid: np.ndarray) -> StepDiff:
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))[valid]
    worst = float(err.max()) if np.isfinite(err).all() else float("inf")  # NaN must not pass a bound
    return StepDiff(case, "prefill" if step == 0 else f"decode {step}", worst, float(np.abs(ref[valid]).max()))


def compare(reference: Runner, candidate: Runner, cases: list[Case], decode_steps: int = 3, seed: int = 1) -> Report:
    rng = np.random.default_rng(seed)
    diffs: list[StepDiff] = []
    for case in cases:
        batch = case.input_ids.shape[0]
        mask = case.attention_mask
        ids, pos = case.input_ids, position_ids(mask)
        past_r: KVCache = reference.empty_past(batch)
        past_c: KVCache = candidate.empty_past(batch)
        for step in range(decode_steps + 1):
            ref, past_r = reference.forward(ids, mask, pos, past_r)
            got, past_c = candidate.forward(ids, mask, pos, past_c)
            diffs.append(_diff(case.name, step, ref, got, mask[:, -ref.shape[1] :].astype(bool)))
            ids = rng.integers(0, reference.config.vocab_size, size=(batch, 1), dtype=np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
    return Report(reference.name, candidate.name, diffs)

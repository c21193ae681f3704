"""The model math under the serving scheduler: a KV cache of `slots` rows that requests take turns on.

The scheduler (`deploy.serve.scheduler`) only ever calls the three methods of `SlotModel`: a new
request's prefill on its own slot, one decode step over every active slot, and a slot's release. What
sits behind them is the runtime:

- `RunnerSlots` (today): any dynamic-contract runner (`deploy.runners`: onnxruntime, TensorRT, torch)
  with its own cache per slot (the windowed policy of `g2trt generate`); a decode step runs the active
  slots one after another. Correct, and token for token what `g2trt generate` gives, but not batched.
- `InPlaceSlots`: the in-place runtime being built (issue 9) - one cache allocated for `slots` rows and
  `max_len` positions, `step(input_ids [B, S], position_ids [B, S], rows) -> logits` writing it in
  place (negative position ids mark left padding). Decode runs all active slots as one batch: this is
  where in-flight batching pays. Written against the tentative API in `InPlaceRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from deploy.generate import kv_cache
from deploy.runners.base import KVCache, Runner


class SlotModel(Protocol):
    slots: int  # rows of the cache: requests generating at once
    max_len: int  # positions per row: prompt + new tokens of one request

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        """Run `prompt` into `slot` (free until now); logits [V] after its last token."""
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Feed each slot its next token; logits [len(slots), V]."""
        ...

    def release(self, slot: int) -> None:
        """Forget `slot`'s cache; the next prefill may take it."""
        ...


class RunnerSlots:
    """A dynamic-contract runner with one cache per slot, stepped one slot at a time (not batched)."""

    def __init__(self, runner: Runner, slots: int, max_len: int, cache: kv_cache.CachePolicy = "window") -> None:
        self.runner = runner
        self.slots = slots
        self.max_len = max_len
        self.policy = kv_cache.check_policy(cache)
        self._past: dict[int, KVCache] = {}
        self._length: dict[int, int] = {}  # tokens in the slot so far (positions 0 .. length-1)

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        ids = np.asarray([prompt], dtype=np.int64)
        self._length[slot] = 0
        return self._step(slot, ids, self.runner.empty_past(1))[0]

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        steps = zip(slots, tokens, strict=True)
        return np.concatenate([self._step(s, np.asarray([[t]], dtype=np.int64), self._past[s]) for s, t in steps])

    def release(self, slot: int) -> None:
        self._past.pop(slot, None)
        self._length.pop(slot, None)

    def _step(self, slot: int, ids: np.ndarray, past: KVCache) -> np.ndarray:
        """One forward of `ids [1, S]` after the slot's past, exactly as `generate` runs a batch of one."""
        start = self._length[slot]
        total = start + ids.shape[1]
        mask = np.ones((1, total), dtype=np.int64)
        pos = np.arange(start, total, dtype=np.int64)[None]
        logits, presents = self.runner.forward(ids, mask, pos, past)
        self._past[slot] = kv_cache.retain(self.runner.config, presents, self.policy)
        self._length[slot] = total
        return np.asarray(logits[:, -1, :], dtype=np.float32)


class InPlaceRunner(Protocol):
    """The in-place runtime's step (tentative, issue 9): the cache is allocated once and written in place."""

    slots: int
    max_len: int

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """`input_ids`, `position_ids` [B, S] for cache `rows` (position < 0: left padding); logits [B, S|1, V]."""
        ...


class InPlaceSlots:
    """`SlotModel` over an in-place runner: prefill on the slot's row alone, decode every active row at once."""

    def __init__(self, runner: InPlaceRunner) -> None:
        self.runner = runner
        self.slots = runner.slots
        self.max_len = runner.max_len
        self._length = [0] * runner.slots

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        ids = np.asarray([prompt], dtype=np.int64)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits = self.runner.step(ids, pos, [slot])
        self._length[slot] = ids.shape[1]
        return np.asarray(logits[0, -1], dtype=np.float32)

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        pos = np.asarray([self._length[s] for s in slots], dtype=np.int64)[:, None]
        logits = self.runner.step(ids, pos, list(slots))
        for s in slots:
            self._length[s] += 1
        return np.asarray(logits[:, -1], dtype=np.float32)

    def release(self, slot: int) -> None:
        self._length[slot] = 0

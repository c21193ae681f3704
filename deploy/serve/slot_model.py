"""The model math under the serving scheduler: a KV cache of `slots` rows that requests take turns on.

The scheduler (`deploy.serve.scheduler`) only ever calls the three methods of `SlotModel`: a new
request's prefill on its own slot, one decode step over every active slot, and a slot's release. What
sits behind them is the runtime:

- `RunnerSlots` (today): any dynamic-contract runner (`deploy.runners`: onnxruntime, TensorRT, torch)
  with its own cache per slot (the windowed policy of `g2trt generate`); a decode step runs the active
  slots one after another. Correct, and token for token what `g2trt generate` gives, but not batched.
- `InPlaceSlots`: an in-place runner (`deploy.runners.base.InplaceRunner`, export/kv_cache.py): one
  cache allocated for `slots` rows and `max_len` positions and written in place. Decode runs all active
  slots as one batch, each at its own position: in-flight batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from deploy.generate import kv_cache
from deploy.generate.loop import chunk_for, prefill
from deploy.runners.base import InplaceRunner, KVCache, Runner, runner_cache_sizes


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


class InPlaceSlots:
    """`SlotModel` over an in-place runner: in-flight batching.

    One cache of `slots` rows is allocated once. A prefill runs on its slot's row alone (a view of the
    cache: rows are contiguous, batch-major); a decode step runs rows [0, highest active] as one batch,
    each row at its own position. Idle rows inside that range step a pad token at position 0, which
    writes only their slot 0, and the next prefill of that row overwrites it before anything reads it
    (the scheduler hands out the lowest free slot, so the range stays tight). A long prompt is prefilled
    in chunks as `generate` does (`chunk_for`), so the rings hold the runner's chunk too.
    """

    def __init__(self, runner: InplaceRunner, slots: int, max_len: int) -> None:
        self.runner = runner
        self.slots = slots
        self.max_len = max_len
        length, ring = runner_cache_sizes(runner, max_len, runner.prefill_chunk or 1)
        self.cache = runner.allocate(slots, length, ring)
        self._next = np.zeros(slots, dtype=np.int64)  # each slot's next position
        self._ids = np.full((slots, 1), runner.config.pad_token_id, dtype=np.int64)
        self._pos = np.zeros((slots, 1), dtype=np.int64)

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        ids = np.asarray([prompt], dtype=np.int64)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        chunk = chunk_for(self.runner, ids.shape[1], "auto")
        logits = prefill(self.runner, ids, pos, self.cache.rows(slot, slot + 1), chunk)
        self._next[slot] = ids.shape[1]
        return np.array(logits[0, -1], dtype=np.float32)

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        rows = np.asarray(slots, dtype=np.int64)
        top = int(rows.max()) + 1
        ids, pos = self._ids[:top], self._pos[:top]
        ids[:, 0] = self.runner.config.pad_token_id
        pos[:, 0] = 0
        ids[rows, 0] = tokens
        pos[rows, 0] = self._next[rows]
        logits = self.runner.step(ids, pos, self.cache.rows(0, top))
        self._next[rows] += 1
        return np.array(logits[rows, -1], dtype=np.float32)

    def release(self, slot: int) -> None:
        self._next[slot] = 0

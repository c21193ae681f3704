"""The model math under the serving scheduler: a KV cache of `slots` rows that requests take turns on.

The scheduler (`deploy.serve.scheduler`) only ever calls the three methods of `SlotModel`: a request's
prefill on its own slot (the whole prompt, or its next chunk, so the scheduler can run decode steps of
the other requests between a long prompt's chunks), one decode step over every decoding slot, and a
slot's release. What sits behind them is the runtime:

- `RunnerSlots` (today): any dynamic-contract runner (`deploy.runners`: onnxruntime, TensorRT, torch)
  with its own cache per slot (the windowed policy of `g2trt generate`); a decode step runs the active
  slots one after another. Correct, and token for token what `g2trt generate` gives, but not batched.
- `InPlaceSlots`: an in-place runner (`deploy.runners.base.InplaceRunner`, export/kv_cache.py): one
  cache allocated for `slots` rows and `max_len` positions and written in place. Decode runs all active
  slots as one batch, each at its own position: in-flight batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

from deploy.generate import kv_cache
from deploy.generate.loop import chunk_for
from deploy.runners.base import InplaceRunner, KVCache, Runner, runner_cache_sizes


class SlotModel(Protocol):
    slots: int  # rows of the cache: requests generating at once
    max_len: int  # positions per row: prompt + new tokens of one request

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray | None:
        """Run the next part of `prompt` into `slot` (free until the first call): all of it, or its next chunk.
        Logits [V] after the prompt's last token once all of it is in; None while some is left (call again)."""
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Feed each slot its next token (slots whose prompt is all in); logits [len(slots), V]."""
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
    cache: rows are contiguous, batch-major); a long prompt goes one chunk per call, in the chunks
    `prefill_chunk` asks for (`chunk_for`; "auto": the ones `generate` takes), so the rings hold a chunk
    too. A decode step runs rows [0, highest decoding] as one batch, each row at its own position. The
    other rows in that range (idle, or between two chunks of their prompt) step a pad token at the next
    position their prefill will write: its slot is written again by that prefill before any query reads
    it, and on a ring the slot's old entry is already out of the next chunk's window (the ring holds
    window + chunk - 1). The scheduler hands out the lowest free slot, so the range stays tight.
    """

    def __init__(
        self, runner: InplaceRunner, slots: int, max_len: int, prefill_chunk: int | Literal["auto"] = "auto"
    ) -> None:
        self.runner = runner
        self.slots = slots
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk  # `generate`'s setting: "auto" (the runner's rule) or a chunk
        largest = runner.prefill_chunk if prefill_chunk == "auto" else prefill_chunk
        length, ring = runner_cache_sizes(runner, max_len, largest or 1)
        self.cache = runner.allocate(slots, length, ring)
        self._next = np.zeros(slots, dtype=np.int64)  # each slot's next position
        self._ids = np.full((slots, 1), runner.config.pad_token_id, dtype=np.int64)
        self._pos = np.zeros((slots, 1), dtype=np.int64)

    def prefill(self, slot: int, prompt: Sequence[int]) -> np.ndarray | None:
        start, width = int(self._next[slot]), len(prompt)
        end = min(width, start + (chunk_for(self.runner, width, self.prefill_chunk) or width))
        ids = np.asarray([prompt[start:end]], dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)[None]
        logits = self.runner.step(ids, pos, self.cache.rows(slot, slot + 1))
        self._next[slot] = end
        return np.array(logits[0, -1], dtype=np.float32) if end == width else None

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        rows = np.asarray(slots, dtype=np.int64)
        top = int(rows.max()) + 1
        ids, pos = self._ids[:top], self._pos[:top]
        ids[:, 0] = self.runner.config.pad_token_id
        pos[:, 0] = self._next[:top]  # other rows: the next position their prefill writes (see the class)
        ids[rows, 0] = tokens
        logits = self.runner.step(ids, pos, self.cache.rows(0, top))
        self._next[rows] += 1
        return np.array(logits[rows, -1], dtype=np.float32)

    def release(self, slot: int) -> None:
        self._next[slot] = 0

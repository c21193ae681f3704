"""The one interface every backend runs behind: a forward step over the g2trt I/O contract.

Arrays are numpy at this boundary so accuracy checks, generation and benchmarks compare any two
runners with the same code (Polygraphy's runner/comparator split).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np

from export import io_contract as io
from export.config import SLIDING, Gemma2Config
from export.errors import G2trtError

KVCache = list[tuple[np.ndarray, np.ndarray]]  # per layer: key, value [B, KV, P_l, Dh]


class Runner(Protocol):
    """The dynamic contract: the caller feeds the past and gets `present = past + this step` back."""

    name: str
    config: Gemma2Config
    kv_cache: Literal["dynamic"]

    def empty_past(self, batch: int) -> KVCache: ...

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """logits [B, S or 1, V] fp32, and the presents (past + this step) per layer."""
        ...


@dataclasses.dataclass(frozen=True)
class InplaceCache:
    """The in-place contract's buffers (export/kv_cache.py), allocated once and written by every step.

    `buffers[i]` = (key, value) [B, KV, C_i, Dh]: numpy for the CPU runners, torch CUDA tensors for
    TensorRT. Global layers hold `length` slots (positions 0 .. length - 1 fit); sliding layers `ring`.
    """

    buffers: list[tuple[Any, Any]]
    length: int
    ring: int

    @property
    def batch(self) -> int:
        return int(self.buffers[0][0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(k) + _nbytes(v) for k, v in self.buffers)

    def rows(self, start: int, stop: int) -> InplaceCache:
        """Rows [start, stop) as a cache of their own: views of the same memory (contiguous, batch-major)."""
        return InplaceCache([(k[start:stop], v[start:stop]) for k, v in self.buffers], self.length, self.ring)


class InplaceRunner(Protocol):
    """The in-place contract: the runner owns the cache; a step writes it and returns only the logits."""

    name: str
    config: Gemma2Config
    kv_cache: Literal["inplace"]
    full_sliding: bool  # True: sliding layers need `length` slots too (no ring), e.g. TensorRT's linear cache update
    full_sliding_max: int | None  # full sliding buffers only up to this many positions (None: always)
    prefill_chunk: int | None  # `generate` prefills long prompts in chunks of this many tokens (None: at once)

    def allocate(self, batch: int, length: int, ring: int | None = None) -> InplaceCache: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: InplaceCache) -> np.ndarray:
        """logits [B, S or 1, V] fp32; writes this step's keys and values into `cache` in place."""
        ...

    def release(self, cache: InplaceCache) -> None:
        """Drop what the runner keeps for `cache` (bindings hold its buffers): call it when done with a cache."""
        ...


class CacheSizeError(G2trtError, ValueError):
    """A step or generation that does not fit the in-place cache."""


def cache_sizes(
    cfg: Gemma2Config, positions: int, full_sliding: bool = False, chunk: int = 1, full_max: int | None = None
) -> tuple[int, int]:
    """(length, ring) for sequences of up to `positions` tokens (prompt + new, padding included).

    A ring needs `window` slots for one-token steps and `window + chunk - 1` when a multi-token step of
    `chunk` tokens continues a sequence (chunked prefill); a first prompt of any length fits any ring.
    `full_sliding`: sliding layers get `positions` slots, for sequences of at most `full_max` positions.
    """
    ring = (
        positions
        if sliding_is_full(positions, full_sliding, full_max)
        else min(positions, cfg.sliding_window + chunk - 1)
    )
    return positions, ring


def sliding_is_full(positions: int, full_sliding: bool, full_max: int | None) -> bool:
    """Whether sequences of `positions` tokens get full-length sliding buffers (`full_sliding`, up to `full_max`)."""
    return full_sliding and (full_max is None or positions <= full_max)


def runner_cache_sizes(runner: InplaceRunner, positions: int, chunk: int = 1) -> tuple[int, int]:
    """`cache_sizes` for what `runner` needs of its sliding buffers."""
    return cache_sizes(runner.config, positions, runner.full_sliding, chunk, runner.full_sliding_max)


def allocate_buffers(
    cfg: Gemma2Config, batch: int, length: int, ring: int, zeros: Callable[[tuple[int, ...]], Any]
) -> InplaceCache:
    if ring > length or ring < min(length, cfg.sliding_window):
        raise CacheSizeError(
            f"a sliding ring of {ring} slots must hold between min(length {length}, window "
            f"{cfg.sliding_window}) and {length} slots"
        )
    buffers = []
    for kind in cfg.layer_types:
        shape = (batch, cfg.num_key_value_heads, ring if kind == SLIDING else length, cfg.head_dim)
        buffers.append((zeros(shape), zeros(shape)))
    return InplaceCache(buffers, length, ring)


def check_step(cache: InplaceCache, input_ids: np.ndarray, position_ids: np.ndarray, window: int) -> None:
    """One-line errors for a step the cache cannot hold (the graph would silently wrap or drop keys)."""
    # Plain Python on the few values it reads: numpy reductions here cost a tiny model's step ~10 µs.
    shape = input_ids.shape
    if shape != position_ids.shape or len(shape) != 2:
        raise CacheSizeError(f"input_ids {shape} and position_ids {position_ids.shape} must be [B, S] alike")
    if shape[0] != cache.batch:
        raise CacheSizeError(f"a batch of {shape[0]} rows for a cache of {cache.batch}")
    last = max(position_ids[:, -1].tolist())
    if last >= cache.length:
        raise CacheSizeError(f"position {last} does not fit a KV cache of {cache.length} slots")
    s = shape[1]
    if s > 1 and cache.ring < cache.length and max(position_ids[:, 0].tolist()) > 0 and s + window - 1 > cache.ring:
        raise CacheSizeError(
            f"a {s}-token step continuing a sequence needs a sliding ring of window + {s - 1} = "
            f"{window + s - 1} slots; this cache has {cache.ring}"
        )


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if isinstance(a, np.ndarray) else int(a.numel() * a.element_size())


def contract_feeds(
    input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
) -> dict[str, np.ndarray]:
    """The graph inputs of one step, by their contract names."""
    feeds = {io.INPUT_IDS: input_ids, io.ATTENTION_MASK: attention_mask, io.POSITION_IDS: position_ids}
    for i, (k, v) in enumerate(past):
        feeds[io.past_name(i, "key")] = k
        feeds[io.past_name(i, "value")] = v
    return feeds


def split_outputs(outputs: list[np.ndarray]) -> tuple[np.ndarray, KVCache]:
    """(logits, presents) from the graph outputs in contract order: logits, present.0.key, present.0.value, ..."""
    return outputs[0], [(outputs[i], outputs[i + 1]) for i in range(1, len(outputs), 2)]


def padded_positions(lengths: list[int] | np.ndarray, width: int) -> np.ndarray:
    """In-place contract positions [B, width] of right-aligned prompts: padding gets negative positions."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(width, dtype=np.int64)[None, :] - (width - lengths)[:, None]


def zeros_past(cfg: Gemma2Config, batch: int, dtype: np.dtype | type) -> KVCache:
    z = np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=dtype)
    return [(z, z) for _ in range(cfg.num_hidden_layers)]

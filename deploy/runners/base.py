"""The one interface every backend runs behind: a forward step over the g2trt I/O contract.

Arrays are numpy at this boundary so accuracy checks, generation and benchmarks compare any two
runners with the same code (Polygraphy's runner/comparator split).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from export import io_contract as io
from export.config import Gemma2Config

KVCache = list[tuple[np.ndarray, np.ndarray]]  # per layer: key, value [B, KV, P_l, Dh]


class Runner(Protocol):
    name: str
    config: Gemma2Config

    def empty_past(self, batch: int) -> KVCache: ...

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """logits [B, S or 1, V] fp32, and the presents (past + this step) per layer."""
        ...


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


def zeros_past(cfg: Gemma2Config, batch: int, dtype: np.dtype | type) -> KVCache:
    z = np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=dtype)
    return [(z, z) for _ in range(cfg.num_hidden_layers)]

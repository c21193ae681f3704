"""KV cache policies of the generation loop: keep every entry, or only each sliding layer's window.

A sliding layer with window W attends to itself and the W - 1 keys before it, so after every step it
needs only its last W - 1 keys and values; global layers need all of them. The exported graph masks
each layer by *its own* past length (the last P_l + S columns of `attention_mask`), so a runner may
hand a sliding layer a trimmed past and get the same logits as with the full one.

`window` is the fixed-size sliding cache TensorRT-LLM calls a cyclic KV cache, kept by copy rather
than in place: the g2trt contract orders a layer's keys chronologically (the mask columns line up
with them), so the oldest entries are dropped and the newest appended each step, a copy of W - 1
entries per sliding layer. An in-place ring (write slot `pos % (W - 1)`, no copy) would need an
attention op that takes key positions, which the ONNX contract does not carry.

Cache arrays are runner-owned: numpy for the PyTorch and onnxruntime runners, CUDA tensors for
TensorRT. The helpers here only slice along the sequence axis, which both support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from export.config import SLIDING, Gemma2Config
from export.errors import G2trtError

CachePolicy = Literal["full", "window"]
POLICIES: tuple[str, ...] = ("full", "window")


def check_policy(policy: str) -> CachePolicy:
    if policy not in POLICIES:
        raise G2trtError(f"unknown KV cache policy {policy!r}; choose from {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


def kept_entries(cfg: Gemma2Config, policy: CachePolicy) -> list[int | None]:
    """Per layer, how many past entries the policy keeps between steps (None: all of them)."""
    if policy == "full":
        return [None] * cfg.num_hidden_layers
    return [cfg.sliding_window - 1 if t == SLIDING else None for t in cfg.layer_types]


def retain(cfg: Gemma2Config, presents: Sequence[tuple[Any, Any]], policy: CachePolicy) -> list[tuple[Any, Any]]:
    """The cache to feed the next step: `presents` with sliding layers trimmed to their window."""
    out = []
    for (k, v), keep in zip(presents, kept_entries(cfg, policy), strict=True):
        if keep is not None and k.shape[2] > keep:
            k, v = _last(k, keep), _last(v, keep)
        out.append((k, v))
    return out


def cache_bytes(cache: Sequence[tuple[Any, Any]]) -> int:
    """Bytes the cache arrays hold (numpy arrays or torch tensors)."""
    return sum(_nbytes(k) + _nbytes(v) for k, v in cache)


def expected_bytes(cfg: Gemma2Config, batch: int, total: int, policy: CachePolicy, itemsize: int) -> int:
    """Bytes `retain` leaves after `total` tokens (prompt + generated, padding included)."""
    per_entry = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * itemsize  # key and value
    return sum(per_entry * (total if keep is None else min(total, keep)) for keep in kept_entries(cfg, policy))


def _last(a: Any, n: int) -> Any:
    tail = a[:, :, a.shape[2] - n :]
    return np.ascontiguousarray(tail) if isinstance(a, np.ndarray) else tail.contiguous()


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if isinstance(a, np.ndarray) else int(a.numel() * a.element_size())

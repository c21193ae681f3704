"""SlidingWindowAttentionInplace: Gemma 2's attention on the in-place KV cache (export/kv_cache.py).

    present_key  = past_key with this step's keys written at slots `position mod C`   (likewise value;
                   the same buffer: present aliases past, TensorRT's getAliasedInput / onnxruntime's
                   shared OrtValue)
    keys         = global (window = 0): the C slots of present_key
                   sliding: present_key's slots holding positions before this step, then `key` itself
    scores       = softcap(q @ keysᵀ * scale, softcap) + mask(position held by each key, position_ids)
    out          = softmax(scores) @ values                                      [B, H, S, Dh]

Inputs: query [B, H, S, Dh] and key/value [B, KV, S, Dh] after RoPE, past_key/past_value [B, KV, C, Dh]
(C: max cache length, or a ring of C >= window slots for a sliding layer), position_ids [B, S] int64
(consecutive per row; negative marks left padding). softcap = 0 means none; window = 0 means global.
Shape and dtype rule: out has query's dtype and shape; presents have the past's shape and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from trt_plugins.attention import ATTRS
from trt_plugins.spec import PluginSpec

if TYPE_CHECKING:  # the reference's imports are made where it runs: graph passes read only SPEC
    from torch import Tensor

T = TypeVar("T")

SPEC = PluginSpec(
    name="SlidingWindowAttentionInplace",
    inputs=("query", "key", "value", "past_key", "past_value", "position_ids"),
    outputs=("out", "present_key", "present_value"),
    attrs=ATTRS,
    doc=__doc__ or "",
)
ALIASES = {1: 3, 2: 4}  # output index -> the input index it shares memory with


def output_shapes(query: T, key: T, value: T, past_key: T, past_value: T, *_: T) -> list[T]:
    return [query, past_key, past_value]


def output_dtypes(query: T, key: T, value: T, past_key: T, past_value: T, *_: T) -> list[T]:
    """The dtype rule above, over any dtype representation (str, torch.dtype, TensorRT DataType)."""
    return [query, past_key, past_value]


def reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    position_ids: Tensor,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Writes `past_key`/`past_value` in place (eager) and returns them as the presents."""
    assert query.shape[1] == num_heads and key.shape[1] == kv_heads and query.shape[3] == head_dim
    from export import kv_cache
    from export.model import grouped_attention

    present_k = kv_cache.write(past_key, key, position_ids)
    present_v = kv_cache.write(past_value, value, position_ids)
    window = int(window)
    keys = (present_k, key) if window else (present_k,)
    values = (present_v, value) if window else (present_v,)
    bias = kv_cache.position_bias(position_ids, kv_cache.key_positions(position_ids, past_key.shape[2], window), window)
    out = grouped_attention(query, keys, values, bias, scale, softcap or None)
    return out.to(query.dtype), present_k, present_v

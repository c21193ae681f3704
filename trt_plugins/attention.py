"""SlidingWindowAttention: Gemma 2's attention core with the KV-cache append, GQA, soft-cap and window.

    present_key   = concat(past_key, key)        [B, KV, P+S, Dh]   (likewise value)
    scores        = softcap(q @ present_keyᵀ * scale, softcap)       per query head, GQA-shared keys
    scores       += mask                          causal; window > 0: key > query - window;
                                                  attention_mask[b, -(P+S):] == 0 -> masked
    out           = softmax(scores) @ present_value                  [B, H, S, Dh]

Inputs: query [B, H, S, Dh] and key/value [B, KV, S, Dh] after RoPE, past_key/past_value
[B, KV, P, Dh], attention_mask [B, >= P+S] int64 (its last P+S columns are this layer's keys, so a
sliding layer may be given a trimmed cache). softcap = 0 means none; window = 0 means global.
Shape and dtype rule: out has query's dtype; presents have key's. Scores and softmax run in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from trt_plugins.spec import Attr, PluginSpec

if TYPE_CHECKING:  # the reference's imports are made where it runs: graph passes read only SPEC and ATTRS
    from torch import Tensor

T = TypeVar("T")

ATTRS = (  # both attention plugins' (trt_plugins/attention_inplace.py takes the same)
    Attr("num_heads", "int", "query heads H"),
    Attr("kv_heads", "int", "key/value heads KV (H % KV == 0)"),
    Attr("head_dim", "int", "Dh"),
    Attr("scale", "float", "score scale, query_pre_attn_scalar ** -0.5"),
    Attr("softcap", "float", "attention logit soft-cap c; 0 = none", 0.0),
    Attr("window", "int", "sliding window in tokens; 0 = global causal", 0),
)

SPEC = PluginSpec(
    name="SlidingWindowAttention",
    inputs=("query", "key", "value", "past_key", "past_value", "attention_mask"),
    outputs=("out", "present_key", "present_value"),
    attrs=ATTRS,
    doc=__doc__ or "",
)


def output_shapes(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], past_key: tuple[int, ...], *_: tuple[int, ...]
) -> list[tuple[int, ...]]:
    b, kv, p, d = past_key
    present = (b, kv, p + key[2], d)
    return [query, present, present]


def output_dtypes(query: T, key: T, *_: T) -> list[T]:
    """The dtype rule above, over any dtype representation (str, torch.dtype, TensorRT DataType)."""
    return [query, key, key]


def reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    attention_mask: Tensor,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    assert query.shape[1] == num_heads and key.shape[1] == kv_heads and query.shape[3] == head_dim
    import torch

    from export.model import attention_bias, attention_core

    k = torch.cat((past_key, key), dim=2)
    v = torch.cat((past_value, value), dim=2)
    seq, total = query.shape[2], k.shape[2]
    bias = attention_bias(attention_mask, seq, total, int(window))
    out = attention_core(query, k, v, bias, scale, softcap or None)
    return out.to(query.dtype), k, v

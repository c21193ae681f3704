"""The two ONNX I/O contracts of g2trt graphs (the names onnxruntime-genai and Optimum use).

dynamic (the default; Optimum/genai interop):

    input_ids                      int64  [batch_size, sequence_length]
    attention_mask                 int64  [batch_size, total_sequence_length]   (past + sequence)
    position_ids                   int64  [batch_size, sequence_length]
    past_key_values.{i}.key|value  dtype  [batch_size, kv_heads, past_sequence_length, head_dim]
    logits                         fp32   [batch_size, sequence_length | 1, vocab_size]
    present.{i}.key|value          dtype  [batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]

Sliding layers name their past dimension `sliding_past_sequence_length`: a runner may keep only the
last `sliding_window - 1` entries there (the graph masks each layer by its own past length).

inplace (fixed-size buffers written in place; rules in export/kv_cache.py):

    input_ids                      int64  [batch_size, sequence_length]
    position_ids                   int64  [batch_size, sequence_length]   (negative = left padding)
    past_key_values.{i}.key|value  dtype  [batch_size, kv_heads, max_cache_length | sliding_cache_length, head_dim]
    logits                         fp32   [batch_size, sequence_length | 1, vocab_size]
    present.{i}.key|value          dtype  same shape as past: the runtime binds it to the same memory
"""

from __future__ import annotations

from typing import Literal

from export.config import SLIDING, Gemma2Config

KvCache = Literal["dynamic", "inplace"]
KV_CACHES: tuple[KvCache, ...] = ("dynamic", "inplace")

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

BATCH = "batch_size"
SEQ = "sequence_length"
TOTAL = "total_sequence_length"
PAST = "past_sequence_length"
SLIDING_PAST = "sliding_past_sequence_length"
CACHE = "max_cache_length"  # inplace: global layers' buffer
SLIDING_CACHE = "sliding_cache_length"  # inplace: sliding layers' ring


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_names(cfg: Gemma2Config) -> list[str]:
    return [past_name(i, k) for i in range(cfg.num_hidden_layers) for k in ("key", "value")]


def present_names(cfg: Gemma2Config) -> list[str]:
    return [present_name(i, k) for i in range(cfg.num_hidden_layers) for k in ("key", "value")]


def input_names(cfg: Gemma2Config, kv_cache: KvCache = "dynamic") -> list[str]:
    if kv_cache == "inplace":
        return [INPUT_IDS, POSITION_IDS, *past_names(cfg)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(cfg)]


def output_names(cfg: Gemma2Config) -> list[str]:
    return [LOGITS, *present_names(cfg)]


def past_dim(cfg: Gemma2Config, layer: int, kv_cache: KvCache = "dynamic") -> str:
    sliding = cfg.layer_types[layer] == SLIDING
    if kv_cache == "inplace":
        return SLIDING_CACHE if sliding else CACHE
    return SLIDING_PAST if sliding else PAST


def contract_of(input_names: list[str]) -> KvCache:
    """Which contract a graph with these inputs keeps (the in-place one has no attention_mask)."""
    return "dynamic" if ATTENTION_MASK in input_names else "inplace"

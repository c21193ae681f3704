"""The ONNX I/O contract every g2trt graph keeps (the names onnxruntime-genai and Optimum use).

    input_ids                      int64  [batch_size, sequence_length]
    attention_mask                 int64  [batch_size, total_sequence_length]   (past + sequence)
    position_ids                   int64  [batch_size, sequence_length]
    past_key_values.{i}.key|value  dtype  [batch_size, kv_heads, past_sequence_length, head_dim]
    logits                         fp32   [batch_size, sequence_length | 1, vocab_size]
    present.{i}.key|value          dtype  [batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]

Sliding layers name their past dimension `sliding_past_sequence_length`: a runner may keep only the
last `sliding_window - 1` entries there (the graph masks each layer by its own past length).
"""

from __future__ import annotations

from export.config import SLIDING, Gemma2Config

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

BATCH = "batch_size"
SEQ = "sequence_length"
TOTAL = "total_sequence_length"
PAST = "past_sequence_length"
SLIDING_PAST = "sliding_past_sequence_length"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_names(cfg: Gemma2Config) -> list[str]:
    return [past_name(i, k) for i in range(cfg.num_hidden_layers) for k in ("key", "value")]


def present_names(cfg: Gemma2Config) -> list[str]:
    return [present_name(i, k) for i in range(cfg.num_hidden_layers) for k in ("key", "value")]


def input_names(cfg: Gemma2Config) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(cfg)]


def output_names(cfg: Gemma2Config) -> list[str]:
    return [LOGITS, *present_names(cfg)]


def past_dim(cfg: Gemma2Config, layer: int) -> str:
    return SLIDING_PAST if cfg.layer_types[layer] == SLIDING else PAST

"""Site labels: which layer (and which norm of it) a site belongs to, from the graph's own data.

Two sources, both independent of node names: dynamo's `namespace` metadata (the module path a node
was traced in) and the I/O contract (`present.{i}.key` is layer i's cache). A graph without either
(e.g. hand-built) gets `None`, and sites are then only counted.
"""

from __future__ import annotations

import re

import onnx_graphsurgeon as gs

from export.config import Gemma2Config
from graph_passes.graph import PassGraph

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
FINAL_NORM = "final norm"
_NORM = re.compile(r"layers\.(\d+)\.(" + "|".join(NORMS) + r")\b")
_FINAL = re.compile(r"\bmodel\.norm\b")
_CACHE = re.compile(r"^(?:present|past_key_values)\.(\d+)\.(?:key|value)$")


def norm_label(g: PassGraph, node: gs.Node) -> str | None:
    ns = g.namespace(node)
    m = _NORM.search(ns)
    if m:
        return f"layer {m.group(1)} {m.group(2)}"
    return FINAL_NORM if _FINAL.search(ns) else None


def expected_norms(cfg: Gemma2Config) -> list[str]:
    return [f"layer {i} {n}" for i in range(cfg.num_hidden_layers) for n in NORMS] + [FINAL_NORM]


def sandwich_label(post_norm_label: str | None) -> str | None:
    """A sandwich is named by its post-norm: layer i's post-attention norm opens 'layer i attn'."""
    if post_norm_label is None:
        return None
    if post_norm_label.endswith("post_attention_layernorm"):
        return post_norm_label.replace("post_attention_layernorm", "attn")
    if post_norm_label.endswith("post_feedforward_layernorm"):
        return post_norm_label.replace("post_feedforward_layernorm", "ffw")
    return None


def expected_sandwiches(cfg: Gemma2Config) -> list[str]:
    return [f"layer {i} {k}" for i in range(cfg.num_hidden_layers) for k in ("attn", "ffw")]


def cache_layer(*tensors: gs.Tensor) -> int | None:
    """Layer index from a KV-cache tensor name of the I/O contract (present.{i}.key, past_key_values.{i}.value)."""
    for t in tensors:
        m = _CACHE.match(t.name)
        if m:
            return int(m.group(1))
    return None


def expected_layers(cfg: Gemma2Config) -> list[str]:
    return [f"layer {i}" for i in range(cfg.num_hidden_layers)]

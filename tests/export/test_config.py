"""g2trt's presets and defaults, pinned against what g2trt does not write itself: the config.json files Google
published for Gemma 2 2B / 9B / 27B (tests/export/fixtures/, read by transformers) and
`transformers.Gemma2Config()`'s defaults.

Every model-level check (g2trt vs transformers, export vs PyTorch) builds both sides from g2trt's own
config, so a wrong preset or default (final soft-cap 50 instead of 30, say) moves both and passes them
all; these tests are where such a value fails.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import transformers

from export.config import HF_DEFAULTS, Gemma2Config, config_from_hf_dict, load_config, preset

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED = {"2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}
REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def published(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{PUBLISHED[name]}.config.json").read_text())


def as_transformers_reads_it(hf: transformers.Gemma2Config) -> dict[str, Any]:
    """A transformers config in g2trt's field names (transformers' values, not g2trt's reading of them)."""
    eos = hf.eos_token_id
    return {
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads,
        "head_dim": hf.head_dim,
        "query_pre_attn_scalar": hf.query_pre_attn_scalar,
        "sliding_window": hf.sliding_window,
        "layer_types": tuple(hf.layer_types),
        "rms_norm_eps": hf.rms_norm_eps,
        "rope_theta": hf.rope_parameters["rope_theta"],
        "attn_logit_softcapping": hf.attn_logit_softcapping,
        "final_logit_softcapping": hf.final_logit_softcapping,
        "max_position_embeddings": hf.max_position_embeddings,
        "tie_word_embeddings": hf.tie_word_embeddings,
        "pad_token_id": hf.pad_token_id,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": tuple(eos) if isinstance(eos, list) else (eos,),
    }


def fields(cfg: Gemma2Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_is_the_published_config_as_transformers_reads_it(name: str) -> None:
    assert fields(preset(name)) == as_transformers_reads_it(transformers.Gemma2Config.from_dict(published(name)))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_g2trt_reads_the_published_config_as_its_preset(name: str) -> None:
    assert load_config(FIXTURES / f"{PUBLISHED[name]}.config.json") == preset(name)


def test_published_values_that_matter_most() -> None:
    """The values the planted bugs moved, stated outright (the published files say so)."""
    for name in PUBLISHED:
        cfg, raw = preset(name), published(name)
        assert cfg.final_logit_softcapping == raw["final_logit_softcapping"] == 30.0
        assert cfg.attn_logit_softcapping == raw["attn_logit_softcapping"] == 50.0
        assert cfg.query_pre_attn_scalar == raw["query_pre_attn_scalar"]
    assert preset("27b").query_pre_attn_scalar == 144 != preset("27b").head_dim  # 27B's scale is not head_dim's


def test_defaults_are_transformers_defaults() -> None:
    hf = as_transformers_reads_it(transformers.Gemma2Config())
    assert fields(preset("2b")) == hf  # transformers' default shapes are the 2B's
    defaults = {f.name: f.default for f in dataclasses.fields(Gemma2Config) if f.default is not dataclasses.MISSING}
    assert defaults == {k: hf[k] for k in defaults}  # every dataclass default (final soft-cap 30, ...)
    assert {k: v for k, v in HF_DEFAULTS.items() if k not in ("eos_token_id", "rope_theta")} == {
        k: hf[k] for k in HF_DEFAULTS if k not in ("eos_token_id", "rope_theta")
    }


@pytest.mark.parametrize("left_out", ["", *HF_DEFAULTS])
def test_a_config_json_that_leaves_keys_out_reads_as_transformers_reads_it(left_out: str) -> None:
    """Only the required keys, or the published 9B file less one key: both readers agree on what is missing."""
    raw = {k: v for k, v in published("9b").items() if k != left_out} if left_out else {}
    raw |= {k: published("9b")[k] for k in REQUIRED}
    assert fields(config_from_hf_dict(raw)) == as_transformers_reads_it(transformers.Gemma2Config.from_dict(raw))

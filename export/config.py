"""Gemma 2 configuration: one frozen dataclass, named presets, and the HF `config.json` reader.

Per-layer attention is data (`layer_types`, as HF writes it), never an `if` on the layer index.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from export.errors import G2trtError

LayerType = Literal["sliding_attention", "full_attention"]
SLIDING: LayerType = "sliding_attention"
GLOBAL: LayerType = "full_attention"


class ConfigError(G2trtError, ValueError):
    """A config.json that is not a Gemma 2 config we can build."""


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[LayerType, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, GLOBAL)})
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def attn_scale(self) -> float:
        """Softmax scale: `query_pre_attn_scalar ** -0.5` (27B: 144 ** -0.5, not head_dim ** -0.5)."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def windows(self) -> tuple[int, ...]:
        """Per-layer attention window in tokens; 0 means global causal."""
        return tuple(self.sliding_window if t == SLIDING else 0 for t in self.layer_types)

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * i + 4 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    def replace(self, **changes: Any) -> Gemma2Config:
        """A copy with `changes`; `num_hidden_layers` alone re-derives the alternating layer types."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = alternating_layer_types(changes["num_hidden_layers"])
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` HF `Gemma2Config` reads (used for manifests and test checkpoints)."""
        return {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            # HF's strict config wants an int here (the real values 256 and 144 are integers)
            "query_pre_attn_scalar": _int_if_integral(self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
        }


def alternating_layer_types(num_layers: int) -> tuple[LayerType, ...]:
    """HF's default: layer 0 is sliding, then global, alternating."""
    types: list[LayerType] = [SLIDING if i % 2 == 0 else GLOBAL for i in range(num_layers)]
    return tuple(types)


def _preset(layers: int, **kw: Any) -> Gemma2Config:
    return Gemma2Config(num_hidden_layers=layers, layer_types=alternating_layer_types(layers), **kw)


PRESETS: dict[str, Gemma2Config] = {
    # The embedded default: small enough for CI, large enough to exercise GQA, windows and soft-caps.
    "tiny": _preset(
        4,
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=16,
        max_position_embeddings=1024,
    ),
    "2b": _preset(
        26,
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    ),
    "9b": _preset(
        42,
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    ),
    "27b": _preset(
        46,
        vocab_size=256000,
        hidden_size=4608,
        intermediate_size=36864,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
        sliding_window=4096,
    ),
}


def preset(name: str) -> Gemma2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


# What `transformers.Gemma2Config` takes for a key config.json leaves out (tests/export/test_config.py pins
# these against transformers itself), so a config.json builds the model transformers builds from it.
HF_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> Gemma2Config:
    """Build a config from HF `config.json` contents; errors name `source` and the bad key. Keys it may
    leave out take transformers' defaults (HF_DEFAULTS)."""
    model_type = raw.get("model_type")
    if model_type != "gemma2":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gemma2'")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_activation {act!r} unsupported (Gemma 2 uses gelu_pytorch_tanh)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{source}: rope type {rope.get('rope_type')!r} unsupported (only 'default')")

    def get(key: str) -> Any:
        return raw[key] if raw.get(key) is not None else HF_DEFAULTS[key]

    try:
        layers = int(raw["num_hidden_layers"])
        eos = get("eos_token_id")
        return Gemma2Config(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(get("num_key_value_heads")),
            head_dim=int(get("head_dim")),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            sliding_window=int(get("sliding_window")),
            layer_types=tuple(raw.get("layer_types") or alternating_layer_types(layers)),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=float(rope.get("rope_theta", get("rope_theta"))),
            attn_logit_softcapping=_opt_float(raw.get("attn_logit_softcapping", HF_DEFAULTS["attn_logit_softcapping"])),
            final_logit_softcapping=_opt_float(
                raw.get("final_logit_softcapping", HF_DEFAULTS["final_logit_softcapping"])
            ),
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            pad_token_id=int(get("pad_token_id")),
            bos_token_id=int(get("bos_token_id")),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (int(eos),),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path) -> Gemma2Config:
    """Read a HF `config.json` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf_dict(raw, str(path))


def _int_if_integral(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)

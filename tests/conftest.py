"""Shared fixtures: tiny random Gemma 2 checkpoints written by `transformers.save_pretrained`, loaded
through the same code a user's checkpoint takes, and one exported tiny model per dtype per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from export.config import Gemma2Config, preset  # noqa: E402
from export.onnx_export import ExportOptions, ExportResult, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402


def hf_model(cfg: Gemma2Config, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32):
    """A `transformers.Gemma2ForCausalLM` (eager attention) holding g2trt's seeded random weights."""
    import transformers

    raw = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    hf_cfg = transformers.Gemma2Config(**raw)
    hf_cfg._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    src = RandomWeights(cfg, seed=seed, scale=scale)
    state = {n: src.get(n) for n in src.names()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def save_checkpoint(
    cfg: Gemma2Config, path: Path, seed: int = 0, max_shard_size: str | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a HF checkpoint directory the way users get them (`save_pretrained`, safetensors)."""
    model = hf_model(cfg, seed, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_cfg() -> Gemma2Config:
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Gemma2Config) -> Path:
    return save_checkpoint(tiny_cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


_EXPORTS: dict[tuple, ExportResult] = {}
# Weights x4: the tiny model's attention logits reach their 50 cap and its final logits ~24 of 30, so both
# soft-caps are active (at x1 its logits stay near 4.7, where a wrong cap barely moves them).
CAPPED_SCALE = 4.0


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_export(dtype="fp32", scale=1.0, **options)` -> ExportResult of the seed-0 tiny model (weights x
    `scale`), cached per session."""

    def get(dtype: str = "fp32", scale: float = 1.0, **options) -> ExportResult:
        key = (dtype, scale, tuple(sorted(options.items())))
        if key not in _EXPORTS:
            out = tmp_path_factory.mktemp(f"export-{dtype}")
            src = RandomWeights(preset("tiny"), scale=scale)
            _EXPORTS[key] = export_onnx(src, out, ExportOptions(dtype=dtype, **options))
        return _EXPORTS[key]

    return get

"""Where weights come from: a HF checkpoint or a seeded random model, behind one small protocol.

Both hand out one tensor at a time by HF name, so building a PyTorch model and streaming an ONNX
export take the same path whatever the source.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import torch

from export.checkpoint import Checkpoint, expected_shapes, open_checkpoint
from export.config import Gemma2Config, preset
from export.errors import G2trtError
from export.model import Gemma2ForCausalLM

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class WeightSource(Protocol):
    config: Gemma2Config

    def names(self) -> Iterator[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance for manifests; `weights_from_description` rebuilds the source."""
        ...


class RandomWeights:
    """Seeded random Gemma 2 weights; each tensor is drawn from its own generator (seed, name).

    Scales keep activations O(1) so attention patterns, soft-caps and norms are all exercised:
    linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1/hidden) (times sqrt(hidden) at lookup), norm
    weights ~ N(0, 0.1). `scale` multiplies everything but the norms.
    """

    def __init__(self, config: Gemma2Config, seed: int = 0, scale: float = 1.0) -> None:
        self.config = config
        self.seed = seed
        self.scale = scale
        self._shapes = expected_shapes(config)

    def names(self) -> Iterator[str]:
        return iter(self._shapes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed, "scale": self.scale}

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(shape) == 1:
            std = 0.1
        elif "embed_tokens" in name or "lm_head" in name:
            std = self.scale * self.config.hidden_size**-0.5
        else:
            std = self.scale * shape[1] ** -0.5
        return torch.randn(shape, generator=gen).mul_(std)  # in place: the same values, one pass less


def open_weights(checkpoint: str | Path | None, preset_name: str = "tiny", seed: int = 0) -> WeightSource:
    """A checkpoint directory if given, else the seeded random model of `preset_name`."""
    if checkpoint is not None:
        return open_checkpoint(checkpoint)
    return RandomWeights(preset(preset_name), seed=seed)


def weights_from_description(description: dict[str, Any], config: Gemma2Config) -> WeightSource:
    """The source a manifest's `source` entry describes (random weights are re-drawn from their seed)."""
    if description.get("kind") == "random":
        return RandomWeights(config, seed=int(description["seed"]), scale=float(description.get("scale", 1.0)))
    if description.get("kind") == "checkpoint":
        return open_checkpoint(description["path"])
    raise G2trtError(f"manifest source {description!r} is neither random weights nor a checkpoint")


def load_model(
    source: WeightSource,
    dtype: str | torch.dtype = "fp32",
    *,
    last_logits_only: bool = False,
    residual_dtype: torch.dtype | None = None,
) -> Gemma2ForCausalLM:
    """A ready `Gemma2ForCausalLM` (eval mode) holding `source`'s weights in `dtype`."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = Gemma2ForCausalLM(source.config, last_logits_only=last_logits_only, residual_dtype=residual_dtype)
    model.cast(dt)
    params = dict(model.named_parameters())
    state = {}
    for name in source.names():
        state[name] = source.get(name).to(params[name].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy view of `t`; bf16 becomes `ml_dtypes.bfloat16` (numpy has no bf16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


__all__ = [
    "DTYPES",
    "Checkpoint",
    "RandomWeights",
    "WeightSource",
    "load_model",
    "open_weights",
    "to_numpy",
    "weights_from_description",
]

"""The PyTorch model as a runner: the reference every other backend is compared with."""

from __future__ import annotations

import numpy as np
import torch

from deploy.runners.base import KVCache, zeros_past
from export.model import Gemma2ForCausalLM
from export.weights import to_numpy


class TorchRunner:
    def __init__(self, model: Gemma2ForCausalLM, name: str = "torch") -> None:
        self.model = model
        self.config = model.config
        self.name = name

    def empty_past(self, batch: int) -> KVCache:
        return zeros_past(self.config, batch, to_numpy(torch.zeros((), dtype=self.model.dtype)).dtype)

    @torch.inference_mode()
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        tpast = [(_tensor(k), _tensor(v)) for k, v in past]
        logits, presents = self.model(
            torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(position_ids), tpast
        )
        return logits.numpy(), [(to_numpy(k), to_numpy(v)) for k, v in presents]


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)

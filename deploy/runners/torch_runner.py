"""The PyTorch model as a runner: the reference every other backend is compared with."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from deploy.runners.base import InplaceCache, KVCache, allocate_buffers, check_step, zeros_past
from export.model import Gemma2ForCausalLM
from export.weights import to_numpy


class TorchRunner:
    """The dynamic contract on the PyTorch model."""

    kv_cache: Literal["dynamic"] = "dynamic"

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


class TorchInplaceRunner:
    """The in-place contract on the PyTorch model: numpy buffers the model writes through torch views."""

    kv_cache: Literal["inplace"] = "inplace"
    full_sliding = False
    full_sliding_max: int | None = None
    prefill_chunk: int | None = None  # not measured: a long prompt goes at once

    def __init__(self, model: Gemma2ForCausalLM, name: str = "torch") -> None:
        self.model = model
        self.config = model.config
        self.name = name
        self.kv_dtype = to_numpy(torch.zeros((), dtype=model.dtype)).dtype

    def allocate(self, batch: int, length: int, ring: int | None = None) -> InplaceCache:
        ring = length if ring is None else ring
        return allocate_buffers(self.config, batch, length, ring, lambda shape: np.zeros(shape, self.kv_dtype))

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: InplaceCache) -> np.ndarray:
        check_step(cache, input_ids, position_ids, self.config.sliding_window)
        buffers = [(_tensor(k), _tensor(v)) for k, v in cache.buffers]  # views: the model writes the arrays
        logits, _ = self.model.forward_inplace(
            torch.from_numpy(np.ascontiguousarray(input_ids)),
            torch.from_numpy(np.ascontiguousarray(position_ids)),
            buffers,
        )
        return logits.numpy()

    def release(self, cache: InplaceCache) -> None:
        """Nothing is kept per cache."""

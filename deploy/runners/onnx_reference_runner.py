"""onnx's own ReferenceEvaluator as a runner: slow, but it executes bf16 graphs, which onnxruntime's CPU
provider cannot, so a bf16 export is still verified numerically here (tiny models only)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from deploy.runners.base import (
    InplaceCache,
    KVCache,
    allocate_buffers,
    check_step,
    contract_feeds,
    split_outputs,
    zeros_past,
)
from export import io_contract as io
from export.config import Gemma2Config

_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16,
}


class OnnxReferenceRunner:
    kv_cache: Literal["dynamic"] = "dynamic"

    def __init__(self, model_path: str | Path, config: Gemma2Config, name: str = "onnx-reference") -> None:
        self.name = name
        self.config = config
        model = onnx.load(str(model_path))
        past = {i.name: i for i in model.graph.input}[io.past_name(0, "key")]
        self.kv_dtype = _NP[past.type.tensor_type.elem_type]
        self.evaluator = ReferenceEvaluator(model)

    def empty_past(self, batch: int) -> KVCache:
        return zeros_past(self.config, batch, self.kv_dtype)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        feeds = contract_feeds(input_ids, attention_mask, position_ids, past)
        return split_outputs(self.evaluator.run(None, feeds))  # type: ignore[arg-type]  # a list for names=None


class OnnxReferenceInplaceRunner(OnnxReferenceRunner):
    """The in-place contract on onnx's reference evaluator (functional: each step's presents are copied
    back into the buffers, which is fine for a verifier and would not be for a runtime)."""

    kv_cache: Literal["inplace"] = "inplace"  # type: ignore[assignment]
    full_sliding = False
    full_sliding_max: int | None = None
    prefill_chunk: int | None = None

    def allocate(self, batch: int, length: int, ring: int | None = None) -> InplaceCache:
        ring = length if ring is None else ring
        return allocate_buffers(self.config, batch, length, ring, lambda shape: np.zeros(shape, self.kv_dtype))

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: InplaceCache) -> np.ndarray:
        check_step(cache, input_ids, position_ids, self.config.sliding_window)
        feeds: dict[str, np.ndarray] = {io.INPUT_IDS: input_ids, io.POSITION_IDS: position_ids}
        for i, (k, v) in enumerate(cache.buffers):
            feeds[io.past_name(i, "key")], feeds[io.past_name(i, "value")] = k, v
        logits, presents = split_outputs(self.evaluator.run(None, feeds))  # type: ignore[arg-type]
        for (k, v), (pk, pv) in zip(cache.buffers, presents, strict=True):
            np.copyto(k, pk)
            np.copyto(v, pv)
        return logits

    def release(self, cache: InplaceCache) -> None:
        """Nothing is kept per cache."""

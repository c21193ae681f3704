"""onnxruntime as a runner (CPU EP here; CUDA EP where onnxruntime-gpu and a GPU are present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from deploy.runners.base import KVCache, zeros_past
from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        config: Gemma2Config,
        *,
        name: str = "ort",
        threads: int | None = None,
        optimize: bool = True,
        providers: list[str] | None = None,
        session_options: ort.SessionOptions | None = None,
    ) -> None:
        self.name = name
        self.config = config
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(model_path), so, providers=providers or ["CPUExecutionProvider"])
        check_contract(self.session, config, str(model_path))
        past_type = {i.name: i.type for i in self.session.get_inputs()}[io.past_name(0, "key")]
        if past_type not in _NP:
            raise G2trtError(f"{model_path}: KV cache type {past_type} cannot run on onnxruntime CPU")
        self.kv_dtype = _NP[past_type]

    def empty_past(self, batch: int) -> KVCache:
        return zeros_past(self.config, batch, self.kv_dtype)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        feeds = {io.INPUT_IDS: input_ids, io.ATTENTION_MASK: attention_mask, io.POSITION_IDS: position_ids}
        for i, (k, v) in enumerate(past):
            feeds[io.past_name(i, "key")] = k
            feeds[io.past_name(i, "value")] = v
        out = self.session.run(None, feeds)
        presents = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.config.num_hidden_layers)]
        return out[0], presents


def check_contract(session: ort.InferenceSession, cfg: Gemma2Config, source: str) -> None:
    """Fail with one line if the graph's input/output names are not the g2trt contract."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    for kind, got, want in (("inputs", got_in, io.input_names(cfg)), ("outputs", got_out, io.output_names(cfg))):
        if got != want:
            missing = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            raise G2trtError(
                f"{source}: graph {kind} differ from the g2trt contract "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})"
            )

"""The outside peer: onnxruntime-genai's own builder and generator run on the same checkpoint.

`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu` converts a local Hugging
Face directory offline. It loads a tokenizer with `AutoTokenizer` even though it only converts weights,
so a random model gets `deploy.generate.tokenizer.write_id_tokenizer`'s minimal tokenizer beside its weights.
Timing uses genai's Generator API the way its examples do: `append_tokens` (prefill) then
`generate_next_token` per token, greedy, `min_length = max_length` so every run makes the same number
of tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.runners import denormals
from export.atomic import atomic_dir
from export.errors import G2trtError

if TYPE_CHECKING:  # export.weights imports torch: the benchmarks' peak-RSS children must not pay for it
    from export.weights import WeightSource


class GenaiError(G2trtError, RuntimeError):
    """The onnxruntime-genai builder failed or its model cannot run."""


def unavailable_reason() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        return f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai"
    return None


def write_hf_checkpoint(source: WeightSource, directory: Path) -> Path:
    """A HF checkpoint directory (config.json, model.safetensors, tokenizer) holding `source`'s weights."""
    from safetensors.torch import save_file

    from deploy.generate.tokenizer import write_id_tokenizer

    with atomic_dir(directory) as tmp:
        tensors = {name: source.get(name).contiguous() for name in source.names()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(source.config.to_hf_dict(), indent=2) + "\n")
        write_id_tokenizer(source.config, tmp)
    return directory


def with_tokenizer(checkpoint: Path, source: WeightSource, work: Path) -> Path:
    """`checkpoint` itself if it has a tokenizer; else a shadow directory of links plus an id tokenizer."""
    from deploy.generate.tokenizer import TOKENIZER_FILE, write_id_tokenizer

    if (checkpoint / TOKENIZER_FILE).is_file():
        return checkpoint
    shadow = work / "hf-with-tokenizer"
    with atomic_dir(shadow) as tmp:
        for f in checkpoint.iterdir():
            if f.is_file():
                (tmp / f.name).symlink_to(f.resolve())
        write_id_tokenizer(source.config, tmp)
    return shadow


def build(hf_dir: Path, out: Path, *, device: str = "cpu", precision: str = "fp32") -> Path:
    """Run the genai builder into `out` (logs to `out`.log); returns the model directory."""
    log = out.with_name(out.name + ".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp)]
        cmd += ["-p", precision, "-e", device, "-c", str(out.parent / "genai-cache")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
        if rc != 0 or not (tmp / "genai_config.json").is_file():
            last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
            raise GenaiError(f"onnxruntime-genai builder failed (exit {rc}): {last[0][:200]}; log: {log}")
    return out


class GenaiModel:
    """An onnxruntime-genai model timed per trial with its Generator (prefill, then one token per call)."""

    name = "ort-genai"

    def __init__(self, model_dir: Path, threads: int | None = None, flush_denormals: bool = False) -> None:
        import onnxruntime_genai as og

        self.og = og
        # `flush_denormals`: run genai in the floating-point mode g2trt's runners use
        # (deploy/runners/denormals.py). genai's config has no session entry for it, but its pool threads
        # inherit the mode of the thread that creates them, and each trial runs on a flushed thread. Off by
        # default, as genai ships: flushed, it was no faster (benchmarks/inplace/results_denormals.md).
        self.flush_denormals = flush_denormals
        config = og.Config(str(model_dir))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        with denormals.Flushed(flush_denormals):
            self.model = og.Model(config)
        raw = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
        self.context = int(raw.get("context_length") or 0) or 1 << 30
        self.window = int((raw.get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0)

    def trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        with denormals.Flushed(self.flush_denormals):
            return self._trial(input_ids, new_tokens)

    def _trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        og = self.og
        batch, prompt = input_ids.shape
        params = og.GeneratorParams(self.model)
        total = prompt + new_tokens
        # genai's sliding-window GQA wants a KV buffer of at least one window; the loop below stops at `total`.
        capacity = max(total, min(self.window, self.context))
        params.set_search_options(max_length=capacity, min_length=total, do_sample=False, batch_size=batch)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(input_ids.astype(np.int32))
        generator.generate_next_token()
        ttft = time.perf_counter() - start
        first = generator.get_next_tokens().tolist()
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - t)
        tokens = [generator.get_sequence(b)[prompt:].tolist() for b in range(batch)]
        if [t[0] for t in tokens] != first:  # the sequence must hold what was generated
            raise GenaiError("onnxruntime-genai returned inconsistent sequences")
        return {"ttft_s": ttft, "step_s": steps, "tokens": tokens, "kv_bytes": None}


def first_row(tokens: list) -> list:
    """Batch row 0 of a trial's tokens: `GenaiModel.trial` gives one list per row; a batch-1 loop may give one list."""
    return tokens[0] if tokens and isinstance(tokens[0], list) else tokens


def teacher_forced_logits(model_dir: Path, input_ids: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Logits [tokens, V] (fp64) of a genai model over `input_ids` [1, tokens], teacher-forced in one prefill
    by genai's own Generator (its graph computes logits for every prompt position)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    raw = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
    window = int((raw.get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(input_ids.shape[1] + 1, window), do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids.astype(np.int32))
    logits = np.asarray(generator.get_output("logits"))
    if logits.shape[:2] != (1, input_ids.shape[1]):
        raise GenaiError(f"onnxruntime-genai returned logits {logits.shape} for {input_ids.shape[1]} tokens")
    return logits[0].astype(np.float64)

"""The g2trt models the benchmarks time, one loop each contract: greedy generation, batch 1 or more,
each step timed with its argmax; and the interleaved rounds every benchmark runs them in. Shared by
bench_ort_targets, bench_inplace, bench_denormals and bench_quant.

Module-level imports stay light (numpy, export's contract and config), and onnxruntime and g2trt's runner
(which pulls in torch through its plugin check) are imported where a model is made: bench_quant's peak-RSS
children load one model each and must carry only what that model needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export import io_contract as io
from export.config import Gemma2Config


@dataclasses.dataclass
class Trials:
    """What `interleaved_trials` recorded per model: each trial's time to first token and decode steps, and
    the greedy tokens (batch row 0) and first logits of its latest trial that gave them."""

    ttft: dict[Any, list[float]]
    steps: dict[Any, list[list[float]]]
    tokens: dict[Any, list[int]]
    first_logits: dict[Any, np.ndarray]


def interleaved_trials(
    models: dict[Hashable, Any],
    prompt: np.ndarray,
    new_tokens: int,
    rounds: int,
    cooldown: float,
    idle_after_warmup: bool = True,
    after_round: Callable[[int], None] | None = None,
) -> Trials:
    """Every model's `trial(prompt, new_tokens)` once per round, the order rotated each round (who runs
    first changes), `cooldown` s idle before each trial so the previous model's thread pool parks before
    we time; first a 2-token warm-up trial of each (first-run allocations, thread pools, prepacked weights)."""
    from deploy.bench.genai_peer import first_row

    names = list(models)
    for m in models.values():
        m.trial(prompt, 2)
        if idle_after_warmup:
            time.sleep(cooldown)
    out = Trials({n: [] for n in names}, {n: [] for n in names}, {}, {})
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(cooldown)
            res = models[n].trial(prompt, new_tokens)
            out.ttft[n].append(res["ttft_s"])
            out.steps[n].append(res["step_s"])
            if res["tokens"] is not None:
                out.tokens[n] = first_row(res["tokens"])
            if res.get("first_logits") is not None:
                out.first_logits[n] = res["first_logits"]
        if after_round is not None:
            after_round(r)
    return out


def cpu_session(model: str | bytes, threads: int) -> Any:
    """An onnxruntime CPU session of a model file or its bytes, `threads` intra-op threads, one inter-op,
    in the floating-point mode g2trt's runners use (denormals flushed: deploy/runners/denormals.py)."""
    import onnxruntime as ort

    from deploy.runners import denormals

    so = denormals.configure(ort.SessionOptions())
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    with denormals.kept_mode():
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def time_floor_rows(session: Any, x: np.ndarray, prompt: int, new_tokens: int) -> dict[str, Any]:
    """A floor model's trial: its graph on `prompt` rows of `x` (prefill), then on one row per step."""
    from deploy.runners.denormals import Flushed

    steps = []
    with Flushed():  # as g2trt's runners run
        for step in range(new_tokens):
            rows = x[:prompt] if step == 0 else x[step : step + 1]
            start = time.perf_counter()
            session.run(None, {"x": rows})
            steps.append(time.perf_counter() - start)
    return {"ttft_s": steps[0], "step_s": steps[1:], "tokens": None, "first_logits": None}


class OrtModel:
    """A g2trt graph in a plain onnxruntime session, run the way a generation loop runs it."""

    def __init__(self, name: str, path: Path, cfg: Gemma2Config, threads: int) -> None:
        self.name, self.cfg = name, cfg
        self.session = cpu_session(str(path), threads)

    def trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        """Greedy generation through IOBinding: the presents stay onnxruntime values and feed the next
        step as they are (as a serving loop keeps them), only the last logits come back to numpy."""
        from deploy.runners.denormals import Flushed

        with Flushed():  # as g2trt's dynamic-contract runner runs
            return self._trial(input_ids, new_tokens)

    def _trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        import onnxruntime as ort

        cfg, sess = self.cfg, self.session
        b, s = input_ids.shape
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32))
        past = [empty] * (2 * cfg.num_hidden_layers)
        mask = np.ones((b, s), np.int64)
        pos = np.arange(s, dtype=np.int64)[None].repeat(b, 0)
        outputs = [o.name for o in sess.get_outputs()]
        ids, steps, tokens, first_logits = input_ids, [], [], None
        for step in range(new_tokens):
            start = time.perf_counter()
            binding = sess.io_binding()
            for name, value in ((io.INPUT_IDS, ids), (io.ATTENTION_MASK, mask), (io.POSITION_IDS, pos)):
                binding.bind_cpu_input(name, value)
            for name, value in zip(io.past_names(cfg), past, strict=True):
                binding.bind_ortvalue_input(name, value)
            for name in outputs:
                binding.bind_output(name, "cpu")
            sess.run_with_iobinding(binding)
            out = binding.get_outputs()
            logits = out[0].numpy()[:, -1]
            nxt = logits.argmax(-1)
            steps.append(time.perf_counter() - start)
            if step == 0:
                first_logits = logits
            tokens.append(int(nxt[0]))
            past = list(out[1:])
            ids = nxt[:, None].astype(np.int64)
            mask = np.ones((b, mask.shape[1] + 1), np.int64)
            pos = pos[:, -1:] + 1
        return {"ttft_s": steps[0], "step_s": steps[1:], "tokens": tokens, "first_logits": first_logits}


class InplaceModel:
    """A g2trt in-place graph through g2trt's runtime: the cache allocated once per trial, written in place."""

    def __init__(
        self,
        name: str,
        path: Path,
        cfg: Gemma2Config,
        threads: int,
        full_sliding: bool | None = None,
        decode_graph: bool | None = None,
        flush_denormals: bool = True,
        prefill_chunk: int | Literal["auto"] | None = "auto",
    ) -> None:
        from deploy.runners.factory import graph_contract
        from deploy.runners.ort_runner import OrtInplaceRunner
        from export.manifest import read_manifest

        self.name, self.cfg, self.prefill_chunk = name, cfg, prefill_chunk
        _, recorded = graph_contract(read_manifest(path))
        full = recorded if full_sliding is None else full_sliding
        # full_sliding=True forces full buffers at any length; None leaves the choice to the manifest
        limit: Literal["manifest"] | None = None if full_sliding else "manifest"
        self.runner = OrtInplaceRunner(
            path,
            cfg,
            threads=threads,
            full_sliding=full,
            full_sliding_max=limit,
            decode_graph=decode_graph,
            flush_denormals=flush_denormals,
        )

    def trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        """The prompt as `generate` prefills it (`prefill_chunk`: "auto" chunks a long one), then decode."""
        from deploy.generate.loop import chunk_for, prefill
        from deploy.runners.base import runner_cache_sizes

        b, s = input_ids.shape
        chunk = chunk_for(self.runner, s, self.prefill_chunk)
        length, ring = runner_cache_sizes(self.runner, s + new_tokens, chunk or 1)
        cache = self.runner.allocate(b, length, ring)
        pos = np.arange(s, dtype=np.int64)[None].repeat(b, 0)
        ids, steps, tokens, first = input_ids, [], [], None
        step_ids, step_pos = np.zeros((b, 1), np.int64), pos[:, -1:].copy()
        for step in range(new_tokens):
            start = time.perf_counter()
            logits = prefill(self.runner, ids, pos, cache, chunk) if step == 0 else self.runner.step(ids, pos, cache)
            nxt = logits[:, -1].argmax(-1)
            steps.append(time.perf_counter() - start)
            if step == 0:
                first = np.array(logits[:, -1])
            tokens.append(int(nxt[0]))
            step_ids[:, 0] = nxt
            step_pos += 1
            ids, pos = step_ids, step_pos
        self.runner.release(cache)
        return {"ttft_s": steps[0], "step_s": steps[1:], "tokens": tokens, "first_logits": first}

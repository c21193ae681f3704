"""`g2trt generate` as a library call: resolve the model, pick the runner, tokenize, generate, detokenize.

Text prompts need a tokenizer (`--tokenizer`, or tokenizer.json beside the model); token ids never do.
An onnxruntime run of a checkpoint exports it to a temporary directory first.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deploy.generate.loop import Generation, GenerationConfig, GenerationError, generate
from deploy.generate.tokenizer import Tokenizer, TokenizerError, find_tokenizer, load_tokenizer
from deploy.runners.factory import check_backend, open_runner, resolve_model
from export.io_contract import KvCache


@dataclasses.dataclass
class GenerateOutput:
    backend: str
    model: str
    prompts: list[list[int]]
    generation: Generation  # the last timed run
    texts: list[str] | None  # decoded new tokens, when a tokenizer is known
    kv_cache: str = "inplace"
    runs: list[Generation] = dataclasses.field(default_factory=list)  # every timed run (--repeat)


def parse_ids(text: str) -> list[int]:
    """ "2, 651 1234" -> [2, 651, 1234] (commas and/or spaces)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise GenerationError(f"--ids {text!r}: expected integers separated by spaces or commas") from None


def run_generate(
    model: str | Path | None,
    backend: str,
    *,
    prompts: Sequence[str] = (),
    ids: Sequence[str] = (),
    config: GenerationConfig = GenerationConfig(),
    tokenizer: str | Path | None = None,
    preset: str = "tiny",
    seed: int = 0,
    threads: int | None = None,
    kv_cache: KvCache | None = None,
    repeat: int = 1,
) -> GenerateOutput:
    """Generate for the prompts; with `repeat > 1`, one untimed warm-up and `repeat` timed runs in this process."""
    check_backend(backend)
    if repeat < 1:
        raise GenerationError(f"--repeat must be >= 1, got {repeat}")
    if bool(prompts) == bool(ids):
        raise GenerationError("give either --prompt TEXT or --ids IDS (each may repeat for a batch)")
    ref = resolve_model(model, preset, seed)
    tok: Tokenizer | None = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif (found := find_tokenizer(ref.directory)) is not None:
        tok = load_tokenizer(found)
    if prompts:
        if tok is None:
            where = ref.directory or f"the random {preset} model"
            raise TokenizerError(f"{where}: no tokenizer.json; pass --tokenizer PATH, or token ids with --ids")
        token_prompts = [tok.encode(p) for p in prompts]
    else:
        token_prompts = [parse_ids(i) for i in ids]
    with tempfile.TemporaryDirectory(prefix="g2trt-generate-") as work:
        runner = open_runner(ref, backend, work_dir=Path(work), threads=threads, kv_cache=kv_cache)
        if repeat > 1:
            generate(runner, token_prompts, config)  # warm-up: first-run allocations and lazy inits
        runs = [generate(runner, token_prompts, config) for _ in range(repeat)]
    generation = runs[-1]
    texts = [tok.decode(t) for t in generation.tokens] if tok is not None else None
    name = str(ref.path) if ref.path else f"random {preset} (seed {seed})"
    return GenerateOutput(backend, name, token_prompts, generation, texts, runner.kv_cache, runs)


def print_output(out: GenerateOutput, as_json: bool = False) -> None:
    """Generated text (or ids) on stdout, one line per prompt; a summary table on stderr."""
    import json

    from deploy import console as ui

    g = out.generation
    if as_json:
        outputs = [
            {"prompt_ids": p, "new_ids": t, "text": None if out.texts is None else out.texts[i], "finish": g.finish[i]}
            for i, (p, t) in enumerate(zip(out.prompts, g.tokens, strict=True))
        ]
        timing = {"ttft_s": g.prefill_s, "decode_tokens_per_s": g.decode_tokens_per_s, "kv_bytes": g.kv_bytes}
        runs = [
            {
                "ttft_s": r.prefill_s,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "step_s": r.step_s,
                "step_s_median": float(np.median(r.step_s)) if r.step_s else None,
            }
            for r in out.runs
        ]
        head = {"backend": out.backend, "model": out.model, "kv_cache": out.kv_cache}
        ui.out.print_json(json.dumps({**head, "outputs": outputs, **timing, "runs": runs}))
        return
    for i, tokens in enumerate(g.tokens):
        text = out.texts[i] if out.texts is not None else " ".join(map(str, tokens))
        ui.out.print(text, markup=False, highlight=False, soft_wrap=True)
    rows = [
        ("model / backend", f"{out.model} / {out.backend}"),
        ("prompts", f"{len(out.prompts)} ({', '.join(str(len(p)) for p in out.prompts)} tokens)"),
        ("new tokens", ", ".join(f"{len(t)} ({f})" for t, f in zip(g.tokens, g.finish, strict=True))),
        ("time to first token", f"{g.prefill_s * 1e3:.1f} ms"),
        ("decode", f"{g.decode_tokens_per_s:.1f} tokens/s" if g.step_s else "-"),
        ("KV cache", f"{out.kv_cache}, {ui.human_bytes(g.kv_bytes)} held"),
    ]
    if len(out.runs) > 1:
        steps = [float(np.median(r.step_s)) * 1e3 for r in out.runs if r.step_s]
        rows.append(("runs (after a warm-up)", f"{len(out.runs)}; median decode step {np.median(steps):.3f} ms"))
    ui.console.print(ui.table("g2trt generate", ["", ""], rows))

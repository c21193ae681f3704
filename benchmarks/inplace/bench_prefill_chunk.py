"""Long prompts in one call or in chunks (`generate`'s `prefill_chunk`): g2trt on onnxruntime vs genai, one run.

    python benchmarks/inplace/bench_prefill_chunk.py           # medium model, prompts 512/1024/2048, ~10 min
    python benchmarks/inplace/bench_prefill_chunk.py --quick   # a smoke run

Why `OrtInplaceRunner` prefills a long prompt in chunks of `PREFILL_CHUNK` tokens, measured: one random
Gemma 2 (the issues' medium model: 6 layers, hidden 512, 8/4 heads, vocab 32k, window 128) exported with
the in-place cache, plain and optimized for `ort`, each prefilled in one call and in chunks of
`--chunk` tokens (each continuing what the last wrote), then decoding `--decode` tokens; and
onnxruntime-genai's model of the same weights, which prefills in one call. One call computes every query
against every key of the prompt and masks; a chunk reads only the keys it can see (its window on sliding
layers, the positions written so far on global ones: graph_passes/inplace_ops.read_slots). Batch 1, same
intra-op threads for all, `--cooldown` idle before every trial, trials interleaved round by round with the
order rotated; two sessions per model and mode, made one call, chunks, chunks, one call (a session's
speed here depends on when it was made); medians over rounds and sessions (prefill) and over every decode
step (decode). Writes results_prefill_chunk.{json,md} beside this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "ort_targets"))

from bench_ort_targets import (  # noqa: E402
    bench_config,
    inplace_model_phrase,
    machine,
    machine_line,
    model_args,
    trial_args,
    write_results,
)

from benchmarks.timed_models import InplaceModel, interleaved_trials  # noqa: E402
from deploy.runners.ort_runner import PREFILL_CHUNK  # noqa: E402
from export.config import Gemma2Config  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402

MODES = ("one call", "chunks")
SETTINGS = ("prompts", "chunk", "decode", "rounds", "threads", "seed", "cooldown")
ORDER = (("one call", 0), ("chunks", 0), ("chunks", 1), ("one call", 1))
REFERENCE = ("ort", "one call", 0)  # greedy tokens and first logits are compared with its


def build(cfg: Gemma2Config, args: argparse.Namespace, work: Path) -> dict[tuple[str, str, int], Any]:
    source = RandomWeights(cfg, seed=args.seed)
    plain = export_onnx(source, work / "plain", ExportOptions(last_logits_only=True, kv_cache="inplace")).model_path
    graphs = {"ort": Path(optimize(plain, "ort", work / "ort").model_path), "plain": Path(plain)}
    models: dict[tuple[str, str, int], Any] = {}
    for name, path in graphs.items():
        for mode, i in ORDER:
            chunk = None if mode == "one call" else args.chunk
            models[name, mode, i] = InplaceModel(name, path, cfg, args.threads, prefill_chunk=chunk)
    if not args.no_genai:
        from deploy.bench.genai_peer import GenaiModel, write_hf_checkpoint
        from deploy.bench.genai_peer import build as build_genai

        model_dir = build_genai(write_hf_checkpoint(source, work / "hf"), work / "genai")
        for i in range(2):
            models["genai", "one call", i] = GenaiModel(model_dir, args.threads)
    return models


def measure(models: dict[tuple[str, str, int], Any], cfg: Gemma2Config, length: int, args: argparse.Namespace):
    prompt = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, size=(1, length), dtype=np.int64)
    trials = interleaved_trials(models, prompt, args.decode + 1, args.rounds, args.cooldown)
    pooled: dict[tuple[str, str], dict[str, list[float]]] = {}
    for key in models:
        p = pooled.setdefault(key[:2], {"ttft": [], "step": []})
        p["ttft"] += trials.ttft[key]
        p["step"] += [t for trial in trials.steps[key] for t in trial]
    genai = pooled.get(("genai", "one call"))
    rows = []
    for (name, mode), p in pooled.items():
        first, reference = trials.first_logits.get((name, mode, 0)), trials.first_logits[REFERENCE]
        row: dict[str, Any] = {
            "model": name,
            "mode": mode,
            "prefill_ms": 1e3 * statistics.median(p["ttft"]),
            "decode_ms": 1e3 * statistics.median(p["step"]),
            "greedy_tokens_same": trials.tokens[name, mode, 0] == trials.tokens[REFERENCE],
            "max_abs_diff_first_logits": None if first is None else float(np.abs(first - reference).max()),
        }
        row["prefill_vs_one_call"] = row["prefill_ms"] / (1e3 * statistics.median(pooled[name, "one call"]["ttft"]))
        if genai is not None:
            row["prefill_vs_genai"] = row["prefill_ms"] / (1e3 * statistics.median(genai["ttft"]))
            row["decode_vs_genai"] = row["decode_ms"] / (1e3 * statistics.median(genai["step"]))
        rows.append(row)
    return rows


def markdown(res: dict[str, Any]) -> str:
    m, s, c = res["machine"], res["settings"], res["config"]
    lines = [
        "# Long prompts in one call or in chunks: g2trt on onnxruntime vs onnxruntime-genai",
        "",
        f"`{res['command']}`",
        "",
        f"{inplace_model_phrase(c)} Batch 1, chunks of {s['chunk']} "
        f"tokens, {s['decode']} decode steps after the prompt, {s['threads']} intra-op threads for every model, "
        f"two sessions per model and mode, {s['rounds']} interleaved rounds (order rotated), {s['cooldown']} s "
        "idle before every trial; medians over rounds and sessions. genai prefills in one call.",
        machine_line(m),
    ]
    for length, rows in res["results"].items():
        lines += [
            "",
            f"## prompt {length}",
            "",
            "| model | prefill | prefill ms | chunks / one call | prefill / genai | decode ms/token | decode / genai "
            "| greedy = `ort` one call | max Δ first logits |",
            "|---|---|---:|---:|---:|---:|---:|:---:|---:|",
        ]
        for r in rows:
            vs = [f"{r[k]:.2f}" if k in r else "-" for k in ("prefill_vs_genai", "decode_vs_genai")]
            diff = r["max_abs_diff_first_logits"]
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['prefill_ms']:.1f} | {r['prefill_vs_one_call']:.2f} | {vs[0]} | "
                f"{r['decode_ms']:.3f} | {vs[1]} | {'yes' if r['greedy_tokens_same'] else 'no'} | "
                f"{'-' if diff is None else f'{diff:.1e}'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=128)
    ap.add_argument("--prompts", default="512,1024,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="tokens per chunk")
    ap.add_argument("--decode", type=int, default=8, help="decode steps per round")
    ap.add_argument("--no-genai", action="store_true")
    trial_args(ap, rounds=5, cooldown=1.0, out=HERE)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.window = 2, 128, 4, 2048, 16
        args.prompts, args.chunk, args.decode, args.rounds, args.cooldown = "64", 16, 2, 2, 0.1
    cfg = bench_config(args)
    lengths = [int(x) for x in args.prompts.split(",")]
    with tempfile.TemporaryDirectory(prefix="g2trt-bench-prefill-chunk-", dir=args.work) as tmp:
        models = build(cfg, args, Path(tmp))
        results = {n: measure(models, cfg, n, args) for n in lengths}
    res = {
        "command": " ".join(["python benchmarks/inplace/bench_prefill_chunk.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "config": {k: v for k, v in cfg.__dict__.items() if k != "layer_types"},
        "results": results,
    }
    write_results(args, "results_prefill_chunk", res, markdown(res))


if __name__ == "__main__":
    main()

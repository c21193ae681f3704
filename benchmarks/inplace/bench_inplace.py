"""The in-place KV cache on onnxruntime CPU: prefill and decode per token vs onnxruntime-genai, in one run.

    python benchmarks/inplace/bench_inplace.py                 # medium model + tiny preset, ~15 min
    python benchmarks/inplace/bench_inplace.py --quick         # a smoke run

One random Gemma 2 (default, the issue's medium model: 6 layers, hidden 512, 8/4 heads, head_dim 64,
vocab 32k, window 128; seeded RandomWeights) is exported by g2trt with last-logits-only logits, with
the dynamic and the in-place KV cache, optimized with `g2trt optimize --target ort`, and converted by
onnxruntime-genai's own builder from the same weights written as a HF checkpoint. Every model runs
greedy generation, batch 1: prefill of a `--prompt`-token prompt (+ the argmax of its last logits)
and `--decode` one-token steps (+ argmax each). g2trt's in-place graphs run through g2trt's runtime
(`OrtInplaceRunner.step`: one buffer bound as past and present, inputs and logits in bound arrays);
its dynamic graphs through IOBinding with onnxruntime values carried between steps; genai through its
Generator (append_tokens, generate_next_token). Same intra-op thread count for all; an idle
`--cooldown` (default 1 s) before every trial so no spinning thread pool bleeds into the next; trials
interleaved round by round, the order rotated each round; medians over rounds (prefill) and over every
decode step of every round (decode). The tiny preset repeats the decode comparison at a size where
per-step overheads, not weights, dominate. Writes results.json and results.md beside this script.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    FLOOR_LAST,
    FloorModel,
    bench_config,
    machine,
    machine_line,
    model_args,
    trial_args,
    write_results,
)

from benchmarks.timed_models import InplaceModel, OrtModel, interleaved_trials  # noqa: E402
from export.config import Gemma2Config, preset  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402


def build_models(cfg: Gemma2Config, threads: int, seed: int, work: Path, genai: bool) -> dict[str, Any]:
    source = RandomWeights(cfg, seed=seed)
    models: dict[str, Any] = {}
    dynamic = export_onnx(source, work / "dynamic", ExportOptions(last_logits_only=True)).model_path
    inplace = export_onnx(source, work / "inplace", ExportOptions(last_logits_only=True, kv_cache="inplace")).model_path
    ort_dynamic = Path(optimize(dynamic, "ort", work / "ort-dynamic").model_path)
    ort_inplace = Path(optimize(inplace, "ort", work / "ort-inplace").model_path)
    models["plain, dynamic"] = OrtModel("plain, dynamic", dynamic, cfg, threads)
    models["ort, dynamic"] = OrtModel("ort, dynamic", ort_dynamic, cfg, threads)
    models["plain, in-place"] = InplaceModel("plain, in-place", inplace, cfg, threads, None)
    models["ort, in-place (ring: sliding layers decode by standard ops)"] = InplaceModel(
        "ort ring", ort_inplace, cfg, threads, False
    )
    full = InplaceModel("ort full", ort_inplace, cfg, threads, True)
    if full.runner.decode_session is not None:  # small weights: decode runs the one-token graph
        models["ort, in-place (full sliding buffers, per-layer If)"] = InplaceModel(
            "ort full, If", ort_inplace, cfg, threads, True, decode_graph=False
        )
        models["ort, in-place (full sliding buffers, one-token graph: the runner's choice)"] = full
    else:
        models["ort, in-place (full sliding buffers: GQA every layer)"] = full
    if genai:
        from deploy.bench.genai_peer import GenaiModel, build, write_hf_checkpoint

        hf = write_hf_checkpoint(source, work / "hf")
        models["genai"] = GenaiModel(build(hf, work / "genai"), threads)
    models[FLOOR_LAST] = FloorModel(FLOOR_LAST, cfg, threads, all_rows=False, seed=seed)
    return models


def measure(
    models: dict[str, Any], cfg: Gemma2Config, prompt_len: int, decode: int, rounds: int, cooldown: float, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, cfg.vocab_size, size=(1, prompt_len), dtype=np.int64)
    trials = interleaved_trials(models, prompt, decode + 1, rounds, cooldown)
    ttft, tokens, logits = trials.ttft, trials.tokens, trials.first_logits
    step = {n: [t for trial in steps for t in trial] for n, steps in trials.steps.items()}
    rows: dict[str, dict[str, Any]] = {}
    ref_name = "plain, dynamic"
    for n in models:
        rows[n] = {
            "prefill_ms": 1e3 * statistics.median(ttft[n]),
            "decode_ms_per_token": 1e3 * statistics.median(step[n]),
            "prefill_samples": len(ttft[n]),
            "decode_samples": len(step[n]),
            "greedy_tokens_match_plain": tokens[n][:decode] == tokens[ref_name][:decode] if n in tokens else None,
        }
        if n in logits:
            rows[n]["max_abs_logit_diff_vs_plain"] = float(np.abs(logits[n] - logits[ref_name]).max())
    genai = rows.get("genai")
    for row in rows.values():
        if genai:
            row["prefill_vs_genai"] = row["prefill_ms"] / genai["prefill_ms"]
            row["decode_vs_genai"] = row["decode_ms_per_token"] / genai["decode_ms_per_token"]
        row["prefill_vs_plain_inplace"] = row["prefill_ms"] / rows["plain, in-place"]["prefill_ms"]
        row["decode_vs_plain_inplace"] = row["decode_ms_per_token"] / rows["plain, in-place"]["decode_ms_per_token"]
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = {}
    settings = {
        "medium": (bench_config(args), args.prompt, args.decode),
        "tiny": (preset("tiny"), args.tiny_prompt, args.decode),
    }
    for section, (cfg, prompt, decode) in settings.items():
        if section == "tiny" and args.no_tiny:
            continue
        with tempfile.TemporaryDirectory(prefix="g2trt-bench-inplace-", dir=args.work) as tmp:
            models = build_models(cfg, args.threads, args.seed, Path(tmp), not args.no_genai)
            rows = measure(models, cfg, prompt, decode, args.rounds, args.cooldown, args.seed)
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "layer_types"}
        sections[section] = {"config": config, "prompt": prompt, "decode": decode, "results": rows}
    return {
        "command": " ".join(["python benchmarks/inplace/bench_inplace.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("rounds", "threads", "seed", "cooldown")},
        "sections": sections,
    }


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        "# The in-place KV cache on onnxruntime CPU vs onnxruntime-genai",
        "",
        f"`{res['command']}`",
        "",
        machine_line(m),
        f"Batch 1, fp32, {s['threads']} intra-op threads for every model, {s['rounds']} interleaved rounds "
        f"(order rotated), {s['cooldown']} s idle before every trial; medians (prefill over rounds, decode over "
        "every step of every round). g2trt exports: last-logits-only.",
    ]
    for section, sec in res["sections"].items():
        c = sec["config"]
        lines += [
            "",
            f"## {section}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']}, "
            f"window {c['sliding_window']}; prompt {sec['prompt']}, {sec['decode']} decode steps",
            "",
            "| model | prefill ms | decode ms/token | prefill / genai | decode / genai | vs plain in-place "
            "(prefill, decode) | greedy = plain |",
            "|---|---:|---:|---:|---:|---:|:---:|",
        ]
        for name, r in sec["results"].items():
            g = (
                (f"{r['prefill_vs_genai']:.2f}", f"{r['decode_vs_genai']:.2f}")
                if "prefill_vs_genai" in r
                else ("-", "-")
            )
            p = f"{r['prefill_vs_plain_inplace']:.2f}, {r['decode_vs_plain_inplace']:.2f}"
            same = r["greedy_tokens_match_plain"]
            lines.append(
                f"| {name} | {r['prefill_ms']:.2f} | {r['decode_ms_per_token']:.3f} | {g[0]} | {g[1]} | {p} | "
                f"{'-' if same is None else 'yes' if same else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=128)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tiny-prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32, help="decode steps per round")
    trial_args(ap, rounds=11, cooldown=1.0, out=HERE)
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--no-tiny", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.window = 2, 128, 4, 2048, 16
        args.prompt, args.decode, args.rounds, args.cooldown = 32, 4, 2, 0.1
    res = run(args)
    write_results(args, "results", res, markdown(res))


if __name__ == "__main__":
    main()

"""Denormals flushed or not (deploy/runners/denormals.py): g2trt's runners and onnxruntime-genai, one run.

    python benchmarks/inplace/bench_denormals.py           # medium model, prompts of 256 and 1024, ~8 min
    python benchmarks/inplace/bench_denormals.py --quick   # a smoke run

Why g2trt's onnxruntime runners flush denormals to zero, measured: one random Gemma 2 (the issues'
medium model: 6 layers, hidden 512, 8/4 heads, vocab 32k, window 128) exported with the in-place cache,
plain and optimized for `ort` (full sliding buffers, the runner's choice at these lengths), each run
through `OrtInplaceRunner` with `flush_denormals` on and off; onnxruntime-genai's model of the same
weights made and run on a thread flushing or not (its pool threads inherit the mode). Greedy generation,
batch 1: prefill of a prompt of each `--prompts` length, then `--decode` one-token steps. Same intra-op threads for all,
`--cooldown` idle before every trial, trials interleaved round by round with the order rotated; medians
over rounds (prefill) and over every decode step of every round (decode). First, the mechanism alone:
onnxruntime's Softmax over a causal [1, heads, S, S] block of scores masked with the dtype's lowest
value (as the graphs mask), flushed and not, medians of 50 runs interleaved. Writes
results_denormals.{json,md} beside this script. Each model runs in three sessions per mode, made in the
order flushed, not, not, flushed, flushed, not (a session's speed here depends on when it was made).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
from export.config import Gemma2Config  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402

MODES = {True: "flushed", False: "not flushed"}


def softmax_block(heads: int, length: int, threads: int, runs: int = 50) -> dict[str, float]:
    """ms per Softmax over a causally masked [1, heads, length, length] block, flushed and not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from deploy.runners import denormals

    shape = [1, heads, length, length]
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 5
    x[..., np.triu(np.ones((length, length), bool), 1)] = np.finfo(np.float32).min
    sessions = {}
    for flush in MODES:
        so = denormals.configure(ort.SessionOptions()) if flush else ort.SessionOptions()
        so.intra_op_num_threads = threads
        with denormals.kept_mode():
            sessions[flush] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    times: dict[bool, list[float]] = {flush: [] for flush in MODES}
    for i in range(runs + 5):
        for flush in MODES:
            with denormals.Flushed(flush):
                start = time.perf_counter()
                sessions[flush].run(None, {"x": x})
                elapsed = time.perf_counter() - start
            if i >= 5:
                times[flush].append(elapsed)
    return {mode: 1e3 * statistics.median(times[flush]) for flush, mode in MODES.items()}


# Three sessions per model and mode, made in the order flushed, not, not, flushed, flushed, not: on this VM
# a session's speed depends on when it was made (later ones ran up to ~6 % faster, ad hoc), which one
# session per mode would have credited to the mode.
ORDER = ((True, 0), (False, 0), (False, 1), (True, 1), (True, 2), (False, 2))


def build(cfg: Gemma2Config, threads: int, seed: int, work: Path, genai: bool) -> dict[tuple[str, bool, int], Any]:
    source = RandomWeights(cfg, seed=seed)
    plain = export_onnx(source, work / "plain", ExportOptions(last_logits_only=True, kv_cache="inplace")).model_path
    ort_graph = Path(optimize(plain, "ort", work / "ort").model_path)
    models: dict[tuple[str, bool, int], Any] = {}
    for flush, i in ORDER:
        models["ort, in-place", flush, i] = InplaceModel("ort", ort_graph, cfg, threads, flush_denormals=flush)
    for flush, i in ORDER:
        models["plain, in-place", flush, i] = InplaceModel("plain", plain, cfg, threads, flush_denormals=flush)
    if genai:
        from deploy.bench.genai_peer import GenaiModel, build, write_hf_checkpoint

        model_dir = build(write_hf_checkpoint(source, work / "hf"), work / "genai")
        for flush, i in ORDER:
            models["genai", flush, i] = GenaiModel(model_dir, threads, flush_denormals=flush)
    return models


def measure(
    models: dict[tuple[str, bool, int], Any], cfg: Gemma2Config, length: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Per model and mode: medians over its sessions' trials (prefill) and steps (decode)."""
    prompt = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, size=(1, length), dtype=np.int64)
    keys = list(models)
    trials = interleaved_trials(models, prompt, args.decode + 1, args.rounds, args.cooldown)
    ttft: dict[Any, list[float]] = {k[:2]: [] for k in keys}  # a model and mode: its sessions pooled
    step: dict[Any, list[float]] = {k[:2]: [] for k in keys}
    tokens = {k[:2]: trials.tokens[k] for k in keys if k[2] == 0}
    for k in keys:
        ttft[k[:2]] += trials.ttft[k]
        step[k[:2]] += [t for trial in trials.steps[k] for t in trial]
    rows = []
    for name in dict.fromkeys(k[0] for k in keys):
        row: dict[str, Any] = {"model": name, "greedy_tokens_same": tokens[name, True] == tokens[name, False]}
        for flush, mode in MODES.items():
            row[f"prefill_ms_{mode}"] = 1e3 * statistics.median(ttft[name, flush])
            row[f"decode_ms_{mode}"] = 1e3 * statistics.median(step[name, flush])
        row["prefill_flushed_vs_not"] = row["prefill_ms_flushed"] / row["prefill_ms_not flushed"]
        row["decode_flushed_vs_not"] = row["decode_ms_flushed"] / row["decode_ms_not flushed"]
        rows.append(row)
    genai = next((r for r in rows if r["model"] == "genai"), None)
    for row in rows:
        if genai is not None:
            for mode in MODES.values():
                row[f"prefill_vs_genai_{mode}"] = row[f"prefill_ms_{mode}"] / genai[f"prefill_ms_{mode}"]
                row[f"decode_vs_genai_{mode}"] = row[f"decode_ms_{mode}"] / genai[f"decode_ms_{mode}"]
    return rows


def markdown(res: dict[str, Any]) -> str:
    m, s, c = res["machine"], res["settings"], res["config"]
    lines = [
        "# Denormals flushed or not: g2trt's onnxruntime runners and onnxruntime-genai",
        "",
        f"`{res['command']}`",
        "",
        f"{inplace_model_phrase(c)} Batch 1, {s['decode']} decode steps "
        f"after the prompt, {s['threads']} intra-op threads for every model, three sessions per model and "
        f"mode (made flushed, not, not, flushed, flushed, not), {s['rounds']} interleaved rounds (order rotated), "
        f"{s['cooldown']} s idle before every trial; medians over the three sessions.",
        machine_line(m),
    ]
    lines += [
        "",
        "## onnxruntime's Softmax alone, causal block [1, heads, S, S] masked with fp32's lowest value",
        "",
        "| S | flushed ms | not flushed ms | flushed / not |",
        "|---:|---:|---:|---:|",
    ]
    for length, t in res["softmax"].items():
        ratio = t["flushed"] / t["not flushed"]
        lines.append(f"| {length} | {t['flushed']:.3f} | {t['not flushed']:.3f} | {ratio:.2f} |")
    for length, rows in res["results"].items():
        lines += ["", f"## prompt {length}", "", *_table(rows)]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | prefill ms (flushed / not) | decode ms/token (flushed / not) | prefill flushed / not | "
        "decode flushed / not | prefill / genai (flushed, not) | decode / genai (flushed, not) | same greedy tokens |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        vs = ("-", "-")
        if "prefill_vs_genai_flushed" in r:
            vs = (
                f"{r['prefill_vs_genai_flushed']:.2f}, {r['prefill_vs_genai_not flushed']:.2f}",
                f"{r['decode_vs_genai_flushed']:.2f}, {r['decode_vs_genai_not flushed']:.2f}",
            )
        lines.append(
            f"| {r['model']} | {r['prefill_ms_flushed']:.2f} / {r['prefill_ms_not flushed']:.2f} | "
            f"{r['decode_ms_flushed']:.3f} / {r['decode_ms_not flushed']:.3f} | {r['prefill_flushed_vs_not']:.3f} | "
            f"{r['decode_flushed_vs_not']:.3f} | {vs[0]} | {vs[1]} | {'yes' if r['greedy_tokens_same'] else 'no'} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=128)
    ap.add_argument("--prompts", default="256,1024", help="prompt lengths, comma-separated")
    ap.add_argument("--decode", type=int, default=16, help="decode steps per round")
    trial_args(ap, rounds=9, cooldown=1.0, out=HERE)
    ap.add_argument("--no-genai", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.window = 2, 128, 4, 2048, 16
        args.prompts, args.decode, args.rounds, args.cooldown = "32", 4, 2, 0.1
    cfg = bench_config(args)
    lengths = [int(x) for x in args.prompts.split(",")]
    softmax = {n: softmax_block(cfg.num_attention_heads, n, args.threads) for n in lengths}
    with tempfile.TemporaryDirectory(prefix="g2trt-bench-denormals-", dir=args.work) as tmp:
        models = build(cfg, args.threads, args.seed, Path(tmp), not args.no_genai)
        results = {n: measure(models, cfg, n, args) for n in lengths}
    res = {
        "command": " ".join(["python benchmarks/inplace/bench_denormals.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("prompts", "decode", "rounds", "threads", "seed", "cooldown")},
        "config": {k: v for k, v in cfg.__dict__.items() if k != "layer_types"},
        "softmax": softmax,
        "results": results,
    }
    write_results(args, "results_denormals", res, markdown(res))


if __name__ == "__main__":
    main()

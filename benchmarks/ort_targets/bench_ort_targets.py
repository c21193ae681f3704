"""onnxruntime CPU latency: the plain export vs the `ort` target (and each pass alone) vs onnxruntime-genai.

    python benchmarks/ort_targets/bench_ort_targets.py                # the issue's setting, ~2 min
    python benchmarks/ort_targets/bench_ort_targets.py --quick        # a smoke run on a small model

One random Gemma 2 (default: 6 layers, hidden 512, 32k vocab; seeded RandomWeights) is exported with
g2trt, optimized with `g2trt optimize --target ort` and with each lowering alone, and converted by
onnxruntime-genai's own builder from the same weights written as a HF checkpoint. Every model then
runs greedy generation, batch 1: prefill of a `--prompt`-token prompt (+ the argmax of its last
logits) and `--decode` single-token steps (+ argmax each). g2trt graphs run in an onnxruntime
session through IOBinding (the cache stays in onnxruntime values between steps); the genai model
runs in genai's Generator (append_tokens, generate_next_token), the runtime it is built for. All run
with the same intra-op thread count, interleaved round by round so load drift hits every model
alike; medians over rounds. The export is last-logits-only (what a generation server runs); genai's
graph computes logits for every prompt position. Writes results.json and results.md beside this
script (or in --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.timed_models import OrtModel, cpu_session, interleaved_trials, time_floor_rows  # noqa: E402
from export.config import Gemma2Config, preset  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import PASSES, optimize  # noqa: E402

# Each lowering alone on the plain export (with the fusion it needs), then the whole target: every pass
# is measured, none assumed to help. "decomposed attention" is the alternative to lower_attention_ort's
# If (trt-native's expand_attention everywhere, no GroupQueryAttention for one-token steps).
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "plain": None,
    "norms -> SimplifiedLayerNorm": ("fuse_rmsnorm", "lower_rmsnorm_ort"),
    "+ sandwich -> SkipSimplifiedLayerNorm": (
        "fuse_rmsnorm",
        "fuse_sandwich_norm",
        "lower_sandwich_ort",
        "lower_rmsnorm_ort",
    ),
    "GELU -> FastGelu": ("fuse_gelu_ort",),
    "q/k/v, gate/up -> one MatMul each": ("fuse_parallel_matmuls",),
    "attention -> If(prompt: ops, token: GQA)": ("insert_sliding_window_attention", "lower_attention_ort"),
    "attention -> decomposed GQA": ("insert_sliding_window_attention", "expand_attention"),
    "tied head -> Gemm(transB)": ("lower_tied_head_ort",),
    "ort, decomposed attention": (
        "fuse_rmsnorm",
        "fuse_sandwich_norm",
        "insert_sliding_window_attention",
        "fuse_gelu_ort",
        "fuse_parallel_matmuls",
        "lower_sandwich_ort",
        "lower_rmsnorm_ort",
        "expand_attention",
        "lower_tied_head_ort",
    ),
    "ort": (),  # the full `ort` target
}


def bench_config(args: argparse.Namespace) -> Gemma2Config:
    return preset("tiny").replace(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        head_dim=args.hidden // args.heads,
        query_pre_attn_scalar=args.hidden // args.heads,
        vocab_size=args.vocab,
        sliding_window=args.window,
        max_position_embeddings=8192,
    )


class FloorModel:
    """The model's weight products and nothing else: per layer q/k/v, o, gate/up, down as MatMuls of the
    model's shapes chained one after the other, then the tied head (on the last row, or on every row as
    genai's graph computes it). No norm, no attention, no activation: what any graph of these fp32
    weights must at least spend, prefill and decode, on this machine (decode reads every weight once)."""

    def __init__(self, name: str, cfg: Gemma2Config, threads: int, all_rows: bool, seed: int) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.name, self.cfg = name, cfg
        rng = np.random.default_rng(seed)
        d, f, q, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
        inits, nodes = [], []

        def matmul(x: str, shape: tuple[int, int], name: str) -> str:
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), f"{name}.w"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [name]))
            return name

        x = "x"
        for i in range(cfg.num_hidden_layers):
            query = matmul(x, (d, q * cfg.head_dim), f"l{i}.q")
            matmul(x, (d, k * cfg.head_dim), f"l{i}.k")
            matmul(x, (d, k * cfg.head_dim), f"l{i}.v")
            o = matmul(query, (q * cfg.head_dim, d), f"l{i}.o")
            gate, up = matmul(o, (d, f), f"l{i}.gate"), matmul(o, (d, f), f"l{i}.up")
            nodes.append(helper.make_node("Mul", [gate, up], [f"l{i}.act"]))
            x = matmul(f"l{i}.act", (f, d), f"l{i}.down")
        inits.append(numpy_helper.from_array((rng.standard_normal((cfg.vocab_size, d)) * 0.02).astype(np.float32), "E"))
        rows = x
        if not all_rows:  # rows = x[-1:]
            consts = (("last", [-1]), ("end", [2**62]), ("axis0", [0]))
            inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in consts]
            nodes.append(helper.make_node("Slice", [x, "last", "end", "axis0"], ["rows"]))
            rows = "rows"
        nodes.append(helper.make_node("Gemm", [rows, "E"], ["logits"], transB=1))
        graph = helper.make_graph(
            nodes,
            "floor",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", d])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        self.session = cpu_session(model.SerializeToString(), threads)
        self.x = rng.standard_normal((8192, d)).astype(np.float32)

    def trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        return time_floor_rows(self.session, self.x, input_ids.shape[1], new_tokens)


FLOOR_LAST = "floor: weight products only, head on the last row"
FLOOR_ALL = "floor: weight products only, head on every row (genai's)"


def build_models(args: argparse.Namespace, cfg: Gemma2Config, work: Path) -> dict[str, Any]:
    source = RandomWeights(cfg, seed=args.seed)
    # last_logits_only: the export a generation server runs (prefill returns the logits it samples from)
    plain = export_onnx(source, work / "plain", ExportOptions(last_logits_only=True)).model_path
    models: dict[str, Any] = {}
    for name, passes in VARIANTS.items():
        if passes is None:
            path = plain
        else:
            chosen = None if not passes else [PASSES[p] for p in passes]
            path = Path(optimize(plain, "ort", work / name.replace(" ", "_"), passes=chosen).model_path)
        models[name] = OrtModel(name, path, cfg, args.threads)
    if not args.no_genai:
        from deploy.bench.genai_peer import GenaiModel, build, write_hf_checkpoint

        hf = write_hf_checkpoint(source, work / "hf")
        models["genai"] = GenaiModel(build(hf, work / "genai"), args.threads)
    models[FLOOR_LAST] = FloorModel(FLOOR_LAST, cfg, args.threads, all_rows=False, seed=args.seed)
    models[FLOOR_ALL] = FloorModel(FLOOR_ALL, cfg, args.threads, all_rows=True, seed=args.seed)
    return models


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = bench_config(args)
    with tempfile.TemporaryDirectory(prefix="g2trt-bench-", dir=args.work) as tmp:
        models = build_models(args, cfg, Path(tmp))
        rng = np.random.default_rng(args.seed)
        prompt = rng.integers(3, cfg.vocab_size, size=(1, args.prompt), dtype=np.int64)
        trials = interleaved_trials(models, prompt, args.decode + 1, args.rounds, args.cooldown)
    ttft, tokens, logits = trials.ttft, trials.tokens, trials.first_logits
    step = {n: [t for trial in steps for t in trial] for n, steps in trials.steps.items()}
    rows = {}
    for n in models:
        rows[n] = {
            "prefill_ms": 1e3 * statistics.median(ttft[n]),
            "decode_ms_per_token": 1e3 * statistics.median(step[n]),
            "prefill_samples": len(ttft[n]),
            "decode_samples": len(step[n]),
            "greedy_tokens_match_plain": tokens[n][: args.decode] == tokens["plain"][: args.decode]
            if n in tokens
            else None,
        }
        if n in logits:
            rows[n]["max_abs_logit_diff_vs_plain"] = float(np.abs(logits[n] - logits["plain"]).max())
    ref = rows.get("genai")
    for row in rows.values():
        if ref:
            row["prefill_vs_genai"] = row["prefill_ms"] / ref["prefill_ms"]
            row["decode_vs_genai"] = row["decode_ms_per_token"] / ref["decode_ms_per_token"]
        row["prefill_vs_plain"] = row["prefill_ms"] / rows["plain"]["prefill_ms"]
        row["decode_vs_plain"] = row["decode_ms_per_token"] / rows["plain"]["decode_ms_per_token"]
    return {
        "command": " ".join(["python benchmarks/ort_targets/bench_ort_targets.py", *sys.argv[1:]]),
        "machine": machine(),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "layer_types"},
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "results": rows,
    }


SETTINGS = ("prompt", "decode", "rounds", "threads", "seed", "window", "cooldown")


def machine() -> dict[str, Any]:
    from deploy.bench.report import machine_info

    return {**machine_info(), "load_avg_at_end": os.getloadavg()}


def markdown(res: dict[str, Any]) -> str:
    s, c, m = res["settings"], res["config"], res["machine"]
    lines = [
        "# onnxruntime CPU: plain export vs `ort` target vs onnxruntime-genai",
        "",
        f"`{res['command']}`",
        "",
        f"Model: random Gemma 2, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}, "
        f"sliding window {c['sliding_window']}, fp32, g2trt export with last_logits_only. "
        f"Batch 1, prompt {s['prompt']}, {s['decode']} decode steps, {s['threads']} threads, "
        f"{s['rounds']} interleaved rounds, medians.",
        f"Machine: {m['cpu']} ({m['cores']} cores), onnxruntime {m['versions'].get('onnxruntime')}, "
        f"onnxruntime-genai {m['versions'].get('onnxruntime-genai')}.",
        "",
        "| model | prefill ms | decode ms/token | prefill / genai | decode / genai | greedy = plain | max Δlogit |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for name, r in res["results"].items():
        ratio = (
            (f"{r['prefill_vs_genai']:.2f}", f"{r['decode_vs_genai']:.2f}") if "prefill_vs_genai" in r else ("-", "-")
        )
        diff = r.get("max_abs_logit_diff_vs_plain")
        lines.append(
            f"| {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {ratio[0]} | {ratio[1]} | "
            f"{_yes_no(r['greedy_tokens_match_plain'])} | {'-' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines) + "\n"


def _yes_no(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def model_args(ap: argparse.ArgumentParser, window: int) -> None:
    """The random model's shape (`bench_config` reads them): the issues' medium model by default."""
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--window", type=int, default=window, help="sliding window")


def machine_line(m: dict[str, Any]) -> str:
    """The markdown line naming the machine, onnxruntime and onnxruntime-genai, and the load at the end."""
    return (
        f"Machine: {m['cpu']} ({m['cores']} cores), onnxruntime {m['versions'].get('onnxruntime')}, "
        f"onnxruntime-genai {m['versions'].get('onnxruntime-genai')}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_end'])}."
    )


def inplace_model_phrase(c: dict[str, Any]) -> str:
    """The random model of a `bench_config` (its config as a dict) and the in-place export, as one sentence."""
    return (
        f"Model: random Gemma 2, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']}, window "
        f"{c['sliding_window']}; fp32, in-place KV cache, last-logits-only."
    )


def write_results(args: argparse.Namespace, stem: str, res: dict[str, Any], text: str) -> Path:
    """`stem`.json and `stem`.md (`stem`_quick.* for --quick) into --out, each written under a temporary
    name and renamed; prints the markdown. Returns the path the files share, without suffix."""
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / (f"{stem}_quick" if args.quick else stem)
    for suffix, content in ((".json", json.dumps(res, indent=2, default=str) + "\n"), (".md", text)):
        tmp = base.with_name(base.name + suffix + ".tmp")
        tmp.write_text(content)
        tmp.replace(base.with_name(base.name + suffix))
    print(text)
    return base


def trial_args(ap: argparse.ArgumentParser, rounds: int, cooldown: float, out: Path) -> None:
    """How the interleaved trials run and where results go: the options every such benchmark takes."""
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cooldown", type=float, default=cooldown, help="idle seconds before each trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small model, few rounds: checks the script runs")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: system temp)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=4096)  # Gemma 2's window: longer than any prompt here
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16, help="decode steps per round")
    trial_args(ap, rounds=15, cooldown=0.1, out=HERE)
    ap.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai (not installed)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab = 2, 128, 4, 2048
        args.prompt, args.decode, args.rounds = 32, 4, 2
    res = run(args)
    write_results(args, "results", res, markdown(res))


if __name__ == "__main__":
    main()

"""What the `ort` target's per-layer `If` costs a decode step on onnxruntime CPU.

    python benchmarks/inplace/bench_if_cost.py [--preset tiny] [--rounds 15]

The in-place `ort` graph chooses per layer, by an `If`, between GroupQueryAttention (one-token steps) and
standard ops (prompts): the faster per step kind (docs/graph_passes.md). onnxruntime runs an `If` by
executing its branch as a subgraph, with per-call bookkeeping. This measures that bookkeeping: the same
graph with every `If` replaced by its GroupQueryAttention branch inlined (a decode-only graph: wrong for
prompts, so the prompt runs on the original graph, then both decode the same cache content), one-token
steps timed alone (`OrtInplaceRunner.step`), interleaved, an idle pause before each trial, medians. The
inlined graph is graph_passes/decode_graph.py's one-token form, which `OrtInplaceRunner` now runs on its
own for graphs of small weights (`decode_graph`); here both runners are told which graph to run.
Writes results_if_cost.{json,md} beside this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from deploy.bench.report import machine_info  # noqa: E402
from deploy.runners.base import cache_sizes  # noqa: E402
from deploy.runners.ort_runner import OrtInplaceRunner  # noqa: E402
from export.config import preset  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402
from graph_passes.decode_graph import decode_graph  # noqa: E402


def decode_only(src: Path, dst: Path) -> int:
    """`src` in its one-token form (graph_passes/decode_graph.py), saved to `dst`; returns how many Ifs."""
    model = onnx.load(src)
    count = decode_graph(model)
    onnx.save(model, dst, save_as_external_data=True, location=dst.name + ".data")
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cooldown", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="g2trt-if-cost-") as tmp:
        work = Path(tmp)
        options = ExportOptions(last_logits_only=True, kv_cache="inplace")
        exported = export_onnx(RandomWeights(cfg), work / "export", options)
        graph = Path(optimize(exported.model_path, "ort", work / "ort").model_path)
        flat = work / "decode_only.onnx"
        ifs = decode_only(graph, flat)
        full = OrtInplaceRunner(graph, cfg, threads=args.threads, full_sliding=True, decode_graph=False)
        inlined = OrtInplaceRunner(flat, cfg, threads=args.threads, full_sliding=True)
        runners = {"ort target (If per layer)": full, "its GQA branches inlined": inlined}
        prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.prompt))
        times: dict[str, list[float]] = {k: [] for k in runners}
        tokens: dict[str, list[int]] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = list(runners)[r % 2 :] + list(runners)[: r % 2]
            for name in order:
                runner = runners[name]
                length, ring = cache_sizes(cfg, args.prompt + args.decode + 1, True)
                cache = runner.allocate(1, length, ring)
                logits = full.step(prompt, np.arange(args.prompt)[None], cache)  # the prompt on the If graph
                ids, pos, seq = np.array([[int(logits[0, -1].argmax())]]), np.array([[args.prompt]]), []
                time.sleep(args.cooldown)
                for _ in range(args.decode):
                    start = time.perf_counter()
                    logits = runner.step(ids, pos, cache)
                    if r:
                        times[name].append(time.perf_counter() - start)
                    ids[0, 0] = int(logits[0, -1].argmax())
                    pos += 1
                    seq.append(int(ids[0, 0]))
                tokens[name] = seq
                runner.release(cache)
    medians = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    a, b = medians.values()
    res = {
        "command": " ".join(["python benchmarks/inplace/bench_if_cost.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": vars(args) | {"out": str(args.out)},
        "ifs": ifs,
        "decode_step_ms": medians,
        "if_cost_us_per_layer": 1e3 * (a - b) / ifs,
        "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
    }
    m = res["machine"]
    lines = [
        "# The per-layer If of the ort target, one decode step",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {m.get('cpu')}, onnxruntime {m.get('versions', {}).get('onnxruntime')}. "
        f"Preset {args.preset}, prompt {args.prompt}, {args.decode} one-token steps "
        f"per trial, {args.rounds} interleaved rounds, {args.threads} threads, {args.cooldown} s idle before "
        "each trial; medians of `OrtInplaceRunner.step` over every step.",
        "",
        "| graph | decode step ms |",
        "|---|---:|",
        *[f"| {k} | {v:.4f} |" for k, v in medians.items()],
        "",
        f"{ifs} Ifs: {res['if_cost_us_per_layer']:.1f} µs per If per step; greedy tokens identical: "
        f"{res['same_tokens']}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_if_cost.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results_if_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Full sliding buffers vs rings for the `ort` target's decode step, by sequence length (one run).

    python benchmarks/inplace/bench_sliding_full_max.py           # medium model, ~5 min
    python benchmarks/inplace/bench_sliding_full_max.py --quick   # a smoke run

What `kv_cache_sliding_full_max` (graph_passes/targets.py) is chosen by. On full buffers every layer of
the `ort` graph decodes on GroupQueryAttention, whose CPU kernel costs in proportion to the positions the
buffer holds; on rings of `window` slots the sliding layers decode by the graph's standard-op branch,
which costs by the ring's slots. One random Gemma 2 (the issues' medium model: 6 layers, hidden 512,
window 128) is exported with the in-place cache, optimized for `ort`, and run through g2trt's runtime
(`OrtInplaceRunner.step`, full buffers forced on or off) for `--decode` one-token steps starting at each
`--positions` value; the plain in-place export (rings, standard ops everywhere) runs beside them. The
cache holds random keys and values (a step's time does not depend on them), so no long prefill is timed.
Trials interleaved round by round, order rotated, `--cooldown` idle before each; medians over every
step of every round. Writes results_sliding_full_max.{json,md} beside this script.
"""

from __future__ import annotations

import argparse
import json
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

from bench_ort_targets import bench_config, machine, model_args, trial_args  # noqa: E402

from deploy.runners.base import InplaceCache, cache_sizes  # noqa: E402
from deploy.runners.ort_runner import OrtInplaceRunner  # noqa: E402
from export.config import Gemma2Config  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402

VARIANTS = ("ort, full sliding buffers", "ort, sliding rings", "plain in-place (rings)")


def build(cfg: Gemma2Config, threads: int, seed: int, work: Path) -> dict[str, tuple[OrtInplaceRunner, bool]]:
    source = RandomWeights(cfg, seed=seed)
    plain = export_onnx(source, work / "plain", ExportOptions(last_logits_only=True, kv_cache="inplace")).model_path
    ort_graph = Path(optimize(plain, "ort", work / "ort").model_path)
    # decode_graph=False: the medium model's weights are over DECODE_GRAPH_MAX_BYTES, the runner's own choice
    full = OrtInplaceRunner(
        ort_graph, cfg, threads=threads, full_sliding=True, full_sliding_max=None, decode_graph=False
    )
    ring = OrtInplaceRunner(ort_graph, cfg, threads=threads, full_sliding=False, decode_graph=False)
    return {
        VARIANTS[0]: (full, True),
        VARIANTS[1]: (ring, False),
        VARIANTS[2]: (OrtInplaceRunner(plain, cfg, threads=threads), False),
    }


def random_cache(runner: OrtInplaceRunner, full: bool, length: int, seed: int) -> InplaceCache:
    cache = runner.allocate(1, *cache_sizes(runner.config, length, full))
    rng = np.random.default_rng(seed)
    for k, v in cache.buffers:
        k[...] = rng.standard_normal(k.shape, dtype=np.float32)
        v[...] = rng.standard_normal(v.shape, dtype=np.float32)
    return cache


def trial(runner: OrtInplaceRunner, cache: InplaceCache, start: int, steps: int) -> list[float]:
    ids, pos, times = np.array([[5]], np.int64), np.array([[start]], np.int64), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.step(ids, pos, cache)
        ids[0, 0] = int(logits[0, -1].argmax())
        times.append(time.perf_counter() - t0)
        pos += 1
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = bench_config(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="g2trt-bench-full-max-", dir=args.work) as tmp:
        runners = build(cfg, args.threads, args.seed, Path(tmp))
        for start in args.positions:
            length = start + args.decode
            caches = {n: random_cache(r, full, length, args.seed) for n, (r, full) in runners.items()}
            steps: dict[str, list[float]] = {n: [] for n in runners}
            names = list(runners)
            for rnd in range(args.rounds):
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    time.sleep(args.cooldown)
                    trial(runners[name][0], caches[name], start, 2)  # warm-up: bindings, first-run allocations
                    steps[name] += trial(runners[name][0], caches[name], start, args.decode)
            ms = {n: statistics.median(t) * 1e3 for n, t in steps.items()}
            rows.append({"positions": start, "decode_ms": ms, "full_vs_ring": ms[VARIANTS[0]] / ms[VARIANTS[1]]})
            print(start, {n: round(v, 3) for n, v in ms.items()}, flush=True)
            for name, (r, _) in runners.items():
                r.release(caches[name])
    return {
        "command": " ".join(["python benchmarks/inplace/bench_sliding_full_max.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("rounds", "decode", "threads", "seed", "cooldown")},
        "config": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "window": cfg.sliding_window},
        "results": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    s, c, m = res["settings"], res["config"], res["machine"]
    lines = [
        "# `ort` target decode: full sliding buffers vs rings, by sequence length",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {m.get('cpu', '?')}, onnxruntime {m.get('versions', {}).get('onnxruntime', '?')}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in m['load_avg_at_end'])}.",
        f"Model: random Gemma 2, {c['layers']} layers, hidden {c['hidden']}, window {c['window']}; batch 1, fp32, "
        f"{s['threads']} threads, {s['rounds']} interleaved rounds of {s['decode']} one-token steps from each "
        f"start position, {s['cooldown']} s idle before each trial; medians over every step.",
        "",
        "| positions | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | full / ring |",
        "|---:|" + "---:|" * (len(VARIANTS) + 1),
    ]
    for r in res["results"]:
        cells = " | ".join(f"{r['decode_ms'][v]:.3f}" for v in VARIANTS)
        lines.append(f"| {r['positions']} | {cells} | {r['full_vs_ring']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=128)
    ap.add_argument("--positions", type=int, nargs="+", default=[300, 700, 1000, 1500, 2000, 4000])
    ap.add_argument("--decode", type=int, default=24, help="one-token steps per trial")
    trial_args(ap, rounds=9, cooldown=0.5, out=HERE)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab = 2, 128, 4, 2048
        args.positions, args.decode, args.rounds, args.cooldown = [40, 200], 4, 2, 0.0
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_sliding_full_max.json").write_text(json.dumps(res, indent=1))
    (args.out / "results_sliding_full_max.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""Serving throughput and latency of a real Triton server (`g2trt serve`) under 1, 4 and 16 concurrent clients.

    python benchmarks/serving/bench_serving.py            # the issue's medium model, ~10 min
    python benchmarks/serving/bench_serving.py --quick    # a smoke run on the tiny model

A random Gemma 2 (default: 6 layers, hidden 512, 8/4 heads, vocab 32k, window 128; seeded) is exported
with the in-place KV cache, optimized for the `ort` target, packaged with `g2trt package` (a
Python-backend generation model with `--slots` cache rows, in-flight batching) and served by the
tritonserver that nvidia-pytriton bundles. For each concurrency level, that many client threads each
send `--requests` requests one after another over HTTP `generate_stream` (server-sent events, one per
token), every request a random prompt of 32-256 tokens and `max_tokens` of 16-64 (seeded, the same
set for every level), greedy. Per request: time to first token (request sent -> first event) and the
inter-token latencies (gaps between consecutive events); per level: generated tokens / wall time.
Medians and p99s over all requests (TTFT) and all gaps (ITL). The client threads share the machine
with the server, as they would on a single host. Writes results.json, results.md and results.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "ort_targets"))

from bench_ort_targets import bench_config, model_args, write_results  # noqa: E402

from deploy.bench.report import machine_info  # noqa: E402
from deploy.generate.tokenizer import write_id_tokenizer  # noqa: E402
from deploy.serve import client  # noqa: E402
from deploy.serve.generate_model import package_repository  # noqa: E402
from deploy.serve.runtime import ServingParams  # noqa: E402
from deploy.serve.server import ServerOptions, TritonServer, unavailable_reason  # noqa: E402
from export.config import Gemma2Config  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402

MODEL = "gemma2_generate"
SETTINGS = ("slots", "max_len", "threads", "requests", "seed", "cooldown", "prefill_chunk")


def build_graph(cfg: Gemma2Config, work: Path, args: argparse.Namespace) -> Path:
    """The in-place `ort` graph's folder, with a tokenizer of ids."""
    source = RandomWeights(cfg, seed=args.seed)
    exported = export_onnx(source, work / "onnx", ExportOptions(last_logits_only=True, kv_cache="inplace"))
    target = Path(optimize(exported.model_path, "ort", work / "ort").model_path)
    write_id_tokenizer(cfg, target.parent)
    return target.parent


def build_repository(graph: Path, out: Path, args: argparse.Namespace, prefill_chunk: int) -> Path:
    params = ServingParams(slots=args.slots, max_len=args.max_len, threads=args.threads, prefill_chunk=prefill_chunk)
    package_repository(graph, out, params=params)
    return out


def requests_for(cfg: Gemma2Config, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, cfg.vocab_size, int(rng.integers(32, 257))).tolist()
        out.append({"input_ids": prompt, "max_tokens": int(rng.integers(16, 65)), "end_id": -1})
    return out


def one_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    stamps: list[float] = []
    for event in client.generate_stream(url, MODEL, {**body, "stream": True}, timeout=600):
        ids = event["output_ids"]
        stamps.extend([time.perf_counter()] * (len(ids) if isinstance(ids, list) else 1))
    return {"ttft": stamps[0] - start, "gaps": list(np.diff(stamps)), "tokens": len(stamps), "start": start}


def level(url: str, concurrency: int, bodies: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """`concurrency` threads, each sending its list of requests in turn; all start together."""
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker(mine: list[dict[str, Any]]) -> None:
        barrier.wait()
        for body in mine:
            try:
                r = one_request(url, body)
            except Exception as e:  # recorded; the level fails below
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(bodies[i],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at concurrency {concurrency}: {errors[0]}")
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "itl_ms_p50": float(np.percentile(gaps, 50)),
        "itl_ms_p99": float(np.percentile(gaps, 99)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"the serve extra is needed: {reason}")
    cfg = bench_config(args)
    rows = []
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="g2trt-bench-serving-", dir=args.work) as tmp:
        graph = build_graph(cfg, Path(tmp), args)
        for i, chunk in enumerate(args.prefill_chunk):  # one server per setting, in the order given
            repo = build_repository(graph, Path(tmp) / f"repo{i}", args, chunk)
            options = ServerOptions(http_port=0, grpc_port=0, metrics_port=0, ready_timeout=300)
            with TritonServer(repo, options) as server:
                url = server.url
                warm = requests_for(cfg, 2, args.seed + 99)
                for body in warm:  # warm-up: first-run allocations in the server
                    one_request(url, body)
                for c in args.concurrency:
                    total = c * args.requests
                    pool = requests_for(cfg, total, args.seed)
                    bodies = [pool[i::c] for i in range(c)]
                    time.sleep(args.cooldown)
                    rows.append({"run": i, "prefill_chunk": chunk, **level(url, c, bodies)})
                    print(json.dumps(rows[-1]), flush=True)
                stats[str(chunk)] = client.metrics(server.metrics_url)
    one = {r["run"]: r["tokens_per_s"] for r in rows if r["concurrency"] == min(args.concurrency)}
    for r in rows:
        r["throughput_vs_one_client"] = r["tokens_per_s"] / one[r["run"]]  # within each server's run
    return {
        "command": " ".join(["python benchmarks/serving/bench_serving.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "config": {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "vocab": cfg.vocab_size,
            "window": cfg.sliding_window,
        },
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "levels": rows,
        "server_metrics": stats,
    }


def markdown(res: dict[str, Any]) -> str:
    c, s, m = res["config"], res["settings"], res["machine"]
    lines = [
        "# Serving: a real Triton server, in-flight batching on the in-place KV cache",
        "",
        f"`{res['command']}`",
        "",
        f"Model: random Gemma 2, {c['layers']} layers, hidden {c['hidden']}, {c['heads']}/{c['kv_heads']} heads, "
        f"vocab {c['vocab']}, window {c['window']}; in-place export, `ort` target, fp32, onnxruntime CPU with "
        f"{s['threads']} threads, {s['slots']} slots. Each client sends {s['requests']} requests in turn over HTTP "
        "generate_stream: prompts of 32-256 tokens, 16-64 new tokens, greedy, the same seeded set per level.",
        f"Machine: {m['cpu']} ({m['cores']} cores, no GPU); the clients share it with the server.",
        "",
        "`prefill chunk`: the generation model's `prefill_chunk` parameter (0: `generate`'s chunks, which these "
        "prompts are too short for, every admitted prompt whole between two decode steps; K: at most K prompt "
        "tokens between two decode steps). Settings run one server each, in the order listed.",
        "",
        "| prefill chunk | clients | requests | tokens | wall s | tokens/s | vs fewest clients | TTFT ms p50 | p99 "
        "| ITL ms p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["levels"]:
        lines.append(
            f"| {r.get('prefill_chunk', 0)} | {r['concurrency']} | {r['requests']} | {r['tokens']} | "
            f"{r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['throughput_vs_one_client']:.2f} | {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} | "
            f"{r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in res["levels"]:
        runs.setdefault(r.get("prefill_chunk", 0), []).append(r)
    for chunk, levels in runs.items():
        c = [r["concurrency"] for r in levels]
        tag = f" (prefill chunk {chunk})" if len(runs) > 1 else ""
        a.plot(c, [r["tokens_per_s"] for r in levels], "o-", label=f"tokens/s{tag}")
        for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "inter-token")):
            b.plot(c, [r[f"{key}_p50"] for r in levels], "o-", label=f"{label} p50{tag}")
            b.plot(c, [r[f"{key}_p99"] for r in levels], "o--", label=f"{label} p99{tag}")
        for ax in (a, b):
            ax.set_xticks(c)
            ax.set_xticklabels([str(x) for x in c])
    a.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput", xscale="log")
    b.set(xlabel="concurrent clients", ylabel="ms", title="latency", xscale="log", yscale="log")
    b.legend(fontsize="small")
    fig.suptitle("g2trt serve: in-flight batching, in-place KV cache (onnxruntime CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, window=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=384, help="positions per slot (prompt + new tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--cooldown", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--prefill-chunk", type=int, nargs="+", default=[0], help="serving prefill_chunk settings, one server each"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.window = 2, 64, 4, 1024, 16
        args.concurrency, args.requests, args.slots = [1, 4], 2, 4
    res = run(args)
    base = write_results(args, "results", res, markdown(res))
    plot(res, base.with_suffix(".png"))


if __name__ == "__main__":
    main()

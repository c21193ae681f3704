"""What one decode step of onnxruntime's CPU GroupQueryAttention costs as its shared buffer fills, with and
without `local_window_size`: does a sliding layer's cost follow the window or the sequence?

    python benchmarks/ort_targets/bench_gqa_length.py [--rounds 300]

One GroupQueryAttention node (bench_gqa_softcap.py's: the medium model's heads, 8 query, 4 KV, head_dim
64; here softcap 50), past and present bound to one buffer of L positions holding L - 1 (as
`OrtInplaceRunner` binds them), one new token. The `ort` target decodes sliding layers this way on
full-length buffers (docs/kv_cache.md). Medians over `--rounds` runs after 20 warm-up runs, 2 intra-op
threads. Writes results_gqa_length.{json,md} beside this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_gqa_softcap import KV as KV_HEADS  # noqa: E402
from bench_gqa_softcap import D as HEAD_DIM  # noqa: E402
from bench_gqa_softcap import H as HEADS  # noqa: E402
from bench_gqa_softcap import gqa_model  # noqa: E402

from deploy.bench.report import machine_info  # noqa: E402

LENGTHS = (129, 300, 1000, 4000, 8192)


def step_us(session: ort.InferenceSession, length: int, rounds: int) -> float:
    rng = np.random.default_rng(0)
    key = rng.standard_normal((1, KV_HEADS, length, HEAD_DIM)).astype(np.float32)
    value = key.copy()
    io = session.io_binding()
    for name, width in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
        io.bind_cpu_input(name, rng.standard_normal((1, 1, width * HEAD_DIM)).astype(np.float32))
    io.bind_cpu_input("seqlens_k", np.array([length - 1], np.int32))  # the new token's slot: the last one
    io.bind_cpu_input("total", np.array(length, np.int32))
    for name, buf in (("k", key), ("v", value)):
        io.bind_input(f"past_{name}", "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
        io.bind_output(f"present_{name}", "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
    io.bind_output("out", "cpu")
    for _ in range(20):
        session.run_with_iobinding(io)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    rows = []
    for window in (-1, args.window):
        session = ort.InferenceSession(gqa_model(50.0, window), so, providers=["CPUExecutionProvider"])
        for length in LENGTHS:
            us = step_us(session, length, args.rounds)
            rows.append({"local_window_size": window, "positions": length, "step_us": us})
            print(rows[-1], flush=True)
        del session
        time.sleep(1.0)
    command = " ".join(["python benchmarks/ort_targets/bench_gqa_length.py", *sys.argv[1:]])
    res = {"command": command, "machine": machine_info(), "rounds": args.rounds, "threads": args.threads, "rows": rows}
    (args.out / "results_gqa_length.json").write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    lines = [
        "# GroupQueryAttention (onnxruntime CPU), one decode step vs positions in the shared buffer",
        "",
        f"`{command}`",
        "",
        f"Machine: {m.get('cpu')}, onnxruntime {ort.__version__}; {args.threads} threads, medians of {args.rounds} "
        f"runs. Heads 8/4, head_dim 64, softcap 50.",
        "",
        "| positions | global (µs) | local_window_size " + str(args.window) + " (µs) |",
        "|---:|---:|---:|",
    ]
    by = {(r["local_window_size"], r["positions"]): r["step_us"] for r in rows}
    for length in LENGTHS:
        lines.append(f"| {length} | {by[(-1, length)]:.1f} | {by[(args.window, length)]:.1f} |")
    (args.out / "results_gqa_length.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""One benchmark backend in its own process: `python -m deploy.bench.worker FD` (started by deploy.bench.run).

Protocol over the inherited socket FD (multiprocessing Connection, pickled tuples):
  parent -> WorkerSpec                 then: ("ready", {load_s, base_rss_mib}) or ("error", reason)
  parent -> ("trial", input_ids, new)  then: ("trial", {ttft_s, step_s, tokens, kv_bytes}) or ("error", reason)
  parent -> ("stop",)                  then: ("stats", {peak_rss_mib, peak_gpu_mib}) and exit
"""

from __future__ import annotations

import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import G2trtError


def rss_mib(field: str) -> float | None:
    """VmRSS (now) or VmHWM (high-water mark) of this process from /proc (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load(spec: Any) -> Any:
    """The runner (or genai model) a WorkerSpec describes."""
    if spec.kind == "genai":
        from deploy.bench.genai_peer import GenaiModel

        return GenaiModel(Path(spec.path), spec.threads)
    cfg = spec.model.gemma
    if spec.kind == "torch":
        import torch

        from deploy.runners.torch_runner import TorchInplaceRunner, TorchRunner
        from export.weights import load_model

        torch.set_num_threads(spec.threads or 1)
        runner = TorchInplaceRunner if spec.kv_cache == "inplace" else TorchRunner
        return runner(load_model(spec.model.source(), "fp32", last_logits_only=True), name=spec.backend)
    if spec.kind == "ort":
        from deploy.runners.factory import graph_contract
        from deploy.runners.ort_runner import OrtInplaceRunner, OrtRunner
        from export.manifest import read_manifest

        contract, full_sliding = graph_contract(read_manifest(spec.path))
        if contract == "inplace":
            return OrtInplaceRunner(spec.path, cfg, name=spec.backend, threads=spec.threads, full_sliding=full_sliding)
        return OrtRunner(spec.path, cfg, name=spec.backend, threads=spec.threads)
    from deploy.runners.trt_runner import open_trt_runner

    return open_trt_runner(spec.path, cfg, name=spec.backend)


def trial(backend: Any, input_ids: np.ndarray, new: int) -> dict[str, Any]:
    """Greedy generation of exactly `new` tokens (no stop token), timed by `deploy.generate.loop`."""
    if hasattr(backend, "trial"):
        return backend.trial(input_ids, new)
    from deploy.generate.loop import GenerationConfig, generate

    g = generate(backend, input_ids.tolist(), GenerationConfig(max_new_tokens=new, stop_tokens=(), cache="window"))
    return {"ttft_s": g.prefill_s, "step_s": g.step_s, "tokens": g.tokens, "kv_bytes": g.kv_peak_bytes}


def one_line(e: BaseException) -> str:
    if isinstance(e, G2trtError):
        return str(e)
    tb = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" at {Path(tb[0].filename).name}:{tb[0].lineno}" if tb else ""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}{at}"[:300]


def serve(conn: Connection) -> None:
    spec = conn.recv()
    base = rss_mib("VmRSS")
    try:
        start = time.perf_counter()
        backend = load(spec)
        conn.send(("ready", {"load_s": time.perf_counter() - start, "base_rss_mib": base}))
    except Exception as e:
        traceback.print_exc()
        conn.send(("error", one_line(e)))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            gpu = None
            if spec.kind == "trt":
                import torch

                gpu = torch.cuda.max_memory_allocated() / 2**20
            conn.send(("stats", {"peak_rss_mib": rss_mib("VmHWM"), "peak_gpu_mib": gpu}))
            return
        try:
            conn.send(("trial", trial(backend, msg[1], msg[2])))
        except Exception as e:
            traceback.print_exc()
            conn.send(("error", one_line(e)))


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()

"""`g2trt bench`: every backend timed in one run, interleaved, with warm-up, against onnxruntime.

Method (say it with the numbers):
- Each backend lives in its own process (`python -m deploy.bench.worker`), so its peak resident
  memory is its own: `peak_rss` is the process's VmHWM (Linux high-water RSS) after all its trials,
  which includes Python and the libraries; `base_rss` is the process before the backend's libraries
  and model load (the interpreter and numpy).
- For each (batch, prompt) the parent runs `warmup` rounds and then `repeats` rounds; a round asks
  every backend for one trial, in an order rotated each round, one at a time (no two run together),
  after `cooldown_s` of idle time (onnxruntime and OpenMP threads spin for a while after their work).
- A trial generates `new` tokens greedily from the same random prompt tokens on every backend, with
  no stop token. TTFT = prefill + choosing the first token; a decode step = one forward, sampling
  and the KV cache update; decode tokens/s = batch x steps / decode time, per trial.
- Medians and p90s are over the `repeats` trials (TTFT, tokens/s) or over all their decode steps
  (step latency). Speedups are against `baseline` (default `ort-plain`): >1 means faster.
- Backends that cannot run here are listed with the reason, never timed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy.bench.report import machine_info, write_results
from export.config import Gemma2Config, config_from_hf_dict
from export.errors import G2trtError

BACKENDS = ("torch", "ort-plain", "ort", "trt", "ort-genai")
BASELINE = "ort-plain"


class BenchError(G2trtError, ValueError):
    """Bad benchmark settings."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    backends: tuple[str, ...] = BACKENDS
    batches: tuple[int, ...] = (1, 4)
    prompts: tuple[int, ...] = (128, 512)
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None  # intra-op threads of every backend; None: all cores
    baseline: str = BASELINE
    dtype: str = "fp32"
    seed: int = 0
    cooldown_s: float = 0.05  # idle time before each trial: the previous backend's spinning threads park
    kv_cache: str = "inplace"  # the KV cache contract of the g2trt backends ("inplace" or "dynamic")

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise BenchError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if not self.backends:
            raise BenchError("no backend to benchmark")
        for name, values in (("--batch", self.batches), ("--prompt", self.prompts)):
            if not values or min(values) < 1:
                raise BenchError(f"{name} values must be >= 1, got {list(values)}")
        if self.new_tokens < 2:
            raise BenchError(f"--new must be >= 2 (the first token and one decode step), got {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError("--repeats must be >= 1 and --warmup >= 0")
        if self.kv_cache not in ("inplace", "dynamic"):
            raise BenchError(f"--kv-cache {self.kv_cache!r}: choose inplace or dynamic")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Picklable description of the weights: a checkpoint directory, or a seeded random model."""

    config: dict[str, Any]  # HF config.json dict
    checkpoint: str | None = None
    seed: int = 0

    @property
    def gemma(self) -> Gemma2Config:
        return config_from_hf_dict(self.config, "model")

    def source(self) -> Any:
        from export.weights import RandomWeights, open_weights

        return open_weights(self.checkpoint) if self.checkpoint else RandomWeights(self.gemma, self.seed)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    backend: str
    kind: str  # "torch", "ort", "trt" or "genai"
    model: ModelSpec
    path: str | None
    threads: int | None
    kv_cache: str = "inplace"


@dataclasses.dataclass
class Row:
    backend: str
    batch: int
    prompt: int
    new: int
    ttft_ms_p50: float
    ttft_ms_p90: float
    decode_tok_s_p50: float
    step_ms_p50: float
    step_ms_p90: float
    kv_mib: float | None
    ttft_speedup: float | None = None
    decode_speedup: float | None = None
    agree_with: str | None = None  # the backend whose greedy tokens are compared
    agree: float | None = None  # fraction of generated tokens equal to that backend's


@dataclasses.dataclass
class BackendInfo:
    backend: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    artifact: str = ""
    load_s: float | None = None
    base_rss_mib: float | None = None
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None


@dataclasses.dataclass
class BenchResult:
    settings: BenchSettings
    model: str
    machine: dict[str, Any]
    backends: list[BackendInfo]
    rows: list[Row]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "g2trt-bench/1",
            "model": self.model,
            "settings": dataclasses.asdict(self.settings),
            "machine": self.machine,
            "method": __doc__.split("Method (say it with the numbers):")[1].strip() if __doc__ else "",
            "backends": [dataclasses.asdict(b) for b in self.backends],
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "seconds": self.seconds,
        }


# --- preparation (parent process) --------------------------------------------------------------------


def prepare(
    model: ModelSpec, settings: BenchSettings, work: Path, artifacts: dict[str, str] | None = None
) -> tuple[list[WorkerSpec], list[BackendInfo]]:
    """Make what each backend runs (exports, graph passes, genai model); a backend that cannot is skipped."""
    from deploy.runners.trt_runner import unavailable_reason as trt_reason

    artifacts = dict(artifacts or {})
    specs: list[WorkerSpec] = []
    skipped: list[BackendInfo] = []
    threads = settings.threads or os.cpu_count() or 1

    def plain_onnx() -> str:
        if "ort-plain" not in artifacts:
            from export.onnx_export import ExportOptions, export_onnx

            # the generation export: logits of the last position only, all a generation reads
            opts = ExportOptions(dtype=settings.dtype, kv_cache=settings.kv_cache, last_logits_only=True)  # type: ignore[arg-type]
            artifacts["ort-plain"] = str(export_onnx(model.source(), work / "onnx", opts).model_path)
        return artifacts["ort-plain"]

    kv = settings.kv_cache
    for backend in settings.backends:
        try:
            if backend == "torch":
                specs.append(WorkerSpec(backend, "torch", model, None, threads, kv))
            elif backend == "ort-plain":
                specs.append(WorkerSpec(backend, "ort", model, plain_onnx(), threads, kv))
            elif backend == "ort":
                path = artifacts.get("ort") or optimized_onnx(Path(plain_onnx()), "ort", work / "ort")
                specs.append(WorkerSpec(backend, "ort", model, path, threads, kv))
            elif backend == "trt":
                reason = trt_reason()
                if reason:
                    raise _Skip(reason)
                native = optimized_onnx(Path(plain_onnx()), "trt-native", work / "trt-native")
                path = artifacts.get("trt") or build_engine(Path(native), work / "trt", settings)
                specs.append(WorkerSpec(backend, "trt", model, path, threads, kv))
            elif backend == "ort-genai":
                path = artifacts.get("ort-genai") or genai_model(model, work)
                specs.append(WorkerSpec(backend, "genai", model, path, threads))
        except _Skip as e:
            skipped.append(BackendInfo(backend, "skipped", str(e)))
        except G2trtError as e:
            skipped.append(BackendInfo(backend, "failed", str(e)))
    return specs, skipped


class _Skip(Exception):
    """A backend this machine cannot run."""


def optimized_onnx(model_path: Path, target: str, out: Path) -> str:
    """The graph-pass output for `target` (graph_passes.optimize)."""
    try:
        from graph_passes import optimize
    except ImportError:
        raise _Skip(f"graph_passes.optimize is not available, so there is no `{target}` target graph") from None
    result = optimize(model_path, target, out)
    path = getattr(result, "model_path", result)
    return str(path)


def build_engine(model_path: Path, out: Path, settings: BenchSettings) -> str:
    """A TensorRT engine of `model_path` whose profiles cover the benchmark's shapes (deploy.engine.build).

    UNVERIFIED: needs a GPU (it only runs when `trt` is not skipped).
    """
    from deploy.engine.build import BuildOptions
    from deploy.engine.build import build_engine as build

    top = max(settings.prompts) + settings.new_tokens
    dims = {"batch": max(settings.batches), "seq": max(settings.prompts), "past": top}
    opt = {"batch": min(settings.batches), "seq": min(settings.prompts), "past": min(settings.prompts)}
    if settings.kv_cache == "inplace":  # one static cache length that holds every trial
        dims = {"batch": dims["batch"], "seq": dims["seq"], "cache": top}
        opt = {"batch": opt["batch"], "seq": opt["seq"]}
    report = build(model_path, out / "model.engine", BuildOptions(opt=opt, max=dims))
    return str(report.engine)


def genai_model(model: ModelSpec, work: Path) -> str:
    from deploy.bench import genai_peer

    reason = genai_peer.unavailable_reason()
    if reason:
        raise _Skip(reason)
    if model.checkpoint:
        hf = genai_peer.with_tokenizer(Path(model.checkpoint), model.source(), work)
    else:
        hf = genai_peer.write_hf_checkpoint(model.source(), work / "hf")
    import onnxruntime as ort

    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return str(genai_peer.build(hf, work / "genai", device=device))


# --- workers -----------------------------------------------------------------------------------------


class _Worker:
    """One backend in its own `python -m deploy.bench.worker` process, driven over a socket pair.

    A fresh interpreter (not multiprocessing's spawn) so the caller's `__main__` is never re-run and
    the process's memory high-water mark is that backend's alone.
    """

    def __init__(self, spec: WorkerSpec, log: Path) -> None:
        self.spec = spec
        self.log = log
        self.conn, child = mp.Pipe()
        fd = child.fileno()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(log, "wb") as f:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "deploy.bench.worker", str(fd)],
                pass_fds=[fd],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
            )
        child.close()
        self.conn.send(spec)

    def receive(self, timeout: float = 3600.0) -> tuple[str, Any]:
        try:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"{self.spec.backend}: no answer in {timeout:.0f} s")
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            code = self.process.wait(10)
            tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            last = tail[0][:200] if tail else "no output"
            return "error", f"worker exited with code {code}: {last} (log: {self.log})"

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        try:
            self.conn.send(("stop",))
            kind, payload = self.receive(60)
            stats = payload if kind == "stats" else {}
        except (OSError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        return stats


# --- the run -----------------------------------------------------------------------------------------


def benchmark(
    model: ModelSpec,
    settings: BenchSettings,
    work: Path,
    *,
    artifacts: dict[str, str] | None = None,
    progress: Any = None,
    label: str = "",
) -> BenchResult:
    """Prepare every backend, run the interleaved trials, and aggregate (see the module docstring)."""
    started = time.perf_counter()
    cfg = model.gemma
    longest = max(settings.prompts) + settings.new_tokens
    if longest > cfg.max_position_embeddings:
        raise BenchError(
            f"--prompt {max(settings.prompts)} + --new {settings.new_tokens} exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    if settings.baseline not in settings.backends:
        raise BenchError(f"baseline {settings.baseline!r} is not among the backends {list(settings.backends)}")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    specs, infos = prepare(model, settings, work, artifacts)
    workers: dict[str, _Worker] = {}
    for spec in specs:
        w = _Worker(spec, work / f"worker-{spec.backend}.log")
        kind, payload = w.receive()
        if kind == "ready":
            workers[spec.backend] = w
            infos.append(BackendInfo(spec.backend, "ok", artifact=spec.path or "", **payload))
        else:
            w.stop()
            infos.append(BackendInfo(spec.backend, "failed", payload, artifact=spec.path or ""))
    trials: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    configs = [(b, p) for b in settings.batches for p in settings.prompts]
    total = len(configs) * (settings.warmup + settings.repeats) * len(workers)
    done = 0
    try:
        for batch, prompt in configs:
            rng = np.random.default_rng([settings.seed, batch, prompt])
            ids = rng.integers(3, cfg.vocab_size, size=(batch, prompt), dtype=np.int64)
            for rnd in range(settings.warmup + settings.repeats):
                names = list(workers)
                names = names[rnd % len(names) :] + names[: rnd % len(names)] if names else names
                for name in names:
                    w = workers[name]
                    time.sleep(settings.cooldown_s)
                    w.conn.send(("trial", ids, settings.new_tokens))
                    kind, payload = w.receive()
                    done += 1
                    if progress:
                        progress(done, total, f"{label}{name} b{batch} p{prompt}")
                    if kind != "trial":
                        _fail(infos, name, payload)
                        workers.pop(name).stop()
                        continue
                    if rnd >= settings.warmup:
                        trials.setdefault((name, batch, prompt), []).append(payload)
    finally:
        for name, w in workers.items():
            stats = w.stop()
            for info in infos:
                if info.backend == name:
                    info.peak_rss_mib = stats.get("peak_rss_mib")
                    info.peak_gpu_mib = stats.get("peak_gpu_mib")
    rows = aggregate(trials, settings, [i.backend for i in infos if i.status == "ok"])
    order = {b: i for i, b in enumerate(settings.backends)}
    infos.sort(key=lambda i: order.get(i.backend, 99))
    name = model.checkpoint or f"random ({_describe(cfg)}, seed {model.seed})"
    return BenchResult(settings, name, machine_info(), infos, rows, time.perf_counter() - started)


def _fail(infos: list[BackendInfo], name: str, reason: str) -> None:
    for info in infos:
        if info.backend == name:
            info.status, info.reason = "failed", reason


def aggregate(
    trials: dict[tuple[str, int, int], list[dict[str, Any]]], settings: BenchSettings, ok: Sequence[str]
) -> list[Row]:
    rows: list[Row] = []
    reference = "torch" if "torch" in ok else settings.baseline
    for batch in settings.batches:
        for prompt in settings.prompts:
            by_backend: dict[str, Row] = {}
            for backend in settings.backends:
                ts = trials.get((backend, batch, prompt))
                if backend not in ok or not ts:
                    continue
                ttft = np.array([t["ttft_s"] for t in ts]) * 1e3
                tok_s = np.array([batch * len(t["step_s"]) / sum(t["step_s"]) for t in ts])
                steps = np.concatenate([t["step_s"] for t in ts]) * 1e3
                kv = [t["kv_bytes"] for t in ts if t.get("kv_bytes")]
                by_backend[backend] = Row(
                    backend,
                    batch,
                    prompt,
                    settings.new_tokens,
                    float(np.median(ttft)),
                    float(np.percentile(ttft, 90)),
                    float(np.median(tok_s)),
                    float(np.median(steps)),
                    float(np.percentile(steps, 90)),
                    max(kv) / 2**20 if kv else None,
                )
            base = by_backend.get(settings.baseline)
            ref_trials = trials.get((reference, batch, prompt))
            for backend, row in by_backend.items():
                if base:
                    row.ttft_speedup = base.ttft_ms_p50 / row.ttft_ms_p50
                    row.decode_speedup = row.decode_tok_s_p50 / base.decode_tok_s_p50
                if ref_trials and backend != reference:
                    want = np.array(ref_trials[0]["tokens"])
                    got = np.array(trials[(backend, batch, prompt)][0]["tokens"])
                    row.agree_with = reference
                    row.agree = float((want == got).mean()) if want.shape == got.shape else 0.0
                rows.append(row)
    return rows


def _describe(cfg: Gemma2Config) -> str:
    c = cfg
    return f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, window {c.sliding_window}"


def parse_list(text: str, option: str, kind: type) -> list[Any]:
    """ "1,4" -> [1, 4] for --batch / --prompt; "torch,ort" -> ["torch", "ort"] for --backends."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [kind(p) for p in items]
    except ValueError:
        raise BenchError(f"{option} {text!r}: expected a comma-separated list of {kind.__name__}") from None


def model_spec(
    checkpoint: str | Path | None, preset: str = "tiny", seed: int = 0, config: Gemma2Config | None = None
) -> ModelSpec:
    """A ModelSpec of a checkpoint directory, or of the seeded random `config` (default: the preset)."""
    if checkpoint is not None:
        from export.checkpoint import open_checkpoint

        return ModelSpec(open_checkpoint(checkpoint).config.to_hf_dict(), str(checkpoint), seed)
    from export.config import preset as get_preset

    return ModelSpec((config or get_preset(preset)).to_hf_dict(), None, seed)


def run(
    checkpoint: str | Path | None,
    settings: BenchSettings,
    out: Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    config: Gemma2Config | None = None,
    artifacts: dict[str, str] | None = None,
    keep_work: bool = False,
) -> tuple[BenchResult, dict[str, Path]]:
    """benchmark() + write_results() with a work directory under `out` (removed unless `keep_work`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deploy import console as ui

    model = model_spec(checkpoint, preset, seed, config)
    work = out / "work"
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=ui.console, transient=True) as bar:
            task = bar.add_task("preparing backends", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"trial {what}")

            result = benchmark(model, settings, work, artifacts=artifacts, progress=progress)
        paths = write_results(result, out)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return result, paths

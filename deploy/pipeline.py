"""The main job: checkpoint (or the embedded tiny model) -> verified ONNX -> three verified targets ->
TensorRT engine -> benchmark, in one call with one summary.

Layout under the output directory:

    onnx/         the export (model.onnx + data + manifest.json)
    trt/ ort/ trt-native/   one folder per graph-pass target (model, manifest, passes.txt/json)
    engine/       model.engine + model.engine.json (TensorRT-RTX, ahead of time)
    bench/        bench.json / bench.md / bench.png
    triton/       the Triton repository: standard-backend model + generation model (served, queried, stopped)
    pipeline.json every stage's row, as the table shows them

Every graph is verified against the same fp32 PyTorch model of the same weights; a verification over
its bound fails the pipeline. Stages this machine cannot run (a missing TensorRT, bf16 in
onnxruntime) are reported as skipped with the reason, never faked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy import console as ui
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.model import Verification, VerifyError, verify_model
from export.atomic import atomic_file
from export.checkpoint import weight_bytes
from export.errors import G2trtError
from export.io_contract import KvCache
from export.onnx_export import DType, ExportOptions, export_onnx
from export.weights import load_model, open_weights

TARGETS = ("trt", "ort", "trt-native")
_SITES = {  # the fusions every target starts with (passes.txt has the full list)
    "fuse_rmsnorm": "norms",
    "fuse_sandwich_norm": "sandwiches",
    "insert_sliding_window_attention": "attention",
    "insert_softcap": "soft-cap",
}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    preset: str = "tiny"
    seed: int = 0
    dtype: DType = "fp32"
    opset: int | None = None  # None: the contract's default (18 dynamic, 24 in-place)
    kv_cache: KvCache = "inplace"  # the runtime default; "dynamic" exports Optimum/genai's I/O
    sm: int = 89  # TensorRT-RTX target compute capability of the engine
    bench: bool = True
    serve: bool = True  # package, serve (real Triton server), query and stop
    verify_max_len: int | None = None  # cap on the "longer than window" prompt; None: window + 9 (crosses it)


@dataclasses.dataclass
class StageRow:
    stage: str
    result: str  # "ok: ...", "FAIL: ..." or "skipped: ..."
    seconds: float
    output: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAIL")


def _timed(stage: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> StageRow:
    start = time.perf_counter()
    result, output, details = fn()
    return StageRow(stage, result, time.perf_counter() - start, output, details)


def _verified(v: Verification) -> tuple[str, str, dict[str, Any]]:
    r = v.report
    verdict = "ok" if v.ok else "FAIL"
    text = (
        f"{verdict}: max|Δlogit| prefill {ui.fmt(r.prefill)}, decode {ui.fmt(r.decode)}; "
        f"{ui.fmt(v.measured)} vs bound {v.bound}; {v.coverage()}"
    )
    details = {"prefill": r.prefill, "decode": r.decode, "measured": v.measured, "bound": str(v.bound), "ok": v.ok}
    return text, str(v.model), details | {"longest_prompt": v.longest, "crosses_window": v.crosses_window}


def run_pipeline(checkpoint: str | Path | None, out: str | Path, options: PipelineOptions) -> list[StageRow]:
    out = Path(out)
    source = open_weights(checkpoint, options.preset, options.seed)
    rows: list[StageRow] = []

    with ui.weight_progress(weight_bytes(source.config, options.dtype), "export") as advance:
        export_options = ExportOptions(dtype=options.dtype, opset=options.opset, kv_cache=options.kv_cache)
        exported = export_onnx(source, out / "onnx", export_options, advance)
    size = sum(p.stat().st_size for p in (out / "onnx").glob("model.onnx*"))
    rows.append(StageRow("export", f"ok: {ui.human_bytes(size)}", exported.seconds, str(exported.model_path)))

    reference = TorchRunner(load_model(source, "fp32"), name="torch fp32")

    def verify(model: Path) -> tuple[str, str, dict[str, Any]]:
        try:
            return _verified(verify_model(model, checkpoint, reference=reference, max_len=options.verify_max_len))
        except VerifyError as e:  # e.g. a bf16 graph with plugin nodes: no CPU runtime for it here
            return f"skipped: {e}", str(model), {}

    with ui.status("verifying the export against PyTorch"):
        rows.append(_timed("verify export", lambda: verify(exported.model_path)))

    from graph_passes import optimize

    optimized: dict[str, Path] = {}
    for target in TARGETS:
        if target == "ort" and options.dtype == "bf16":
            reason = "skipped: onnxruntime's CPU provider has no bf16 kernels; the ort target takes fp32 or fp16"
            rows.append(StageRow("optimize ort", reason, 0.0, str(out / target)))
            continue
        with ui.status(f"graph passes: {target}"):
            report = optimize(exported.model_path, target, out / target)
        optimized[target] = Path(report.model_path)
        counts = {p.name: p.count for p in report.passes}
        sites = ", ".join(f"{label} {counts[name]}" for name, label in _SITES.items() if name in counts)
        text = f"ok: {report.nodes_before} -> {report.nodes_after} nodes; {sites}"
        rows.append(StageRow(f"optimize {target}", text, report.seconds, report.model_path))
        with ui.status(f"verifying {target} against PyTorch"):
            rows.append(_timed(f"verify {target}", lambda p=optimized[target]: verify(p)))  # type: ignore[misc]

    with ui.status(f"building a TensorRT-RTX engine for SM {options.sm}"):
        rows.append(_timed("build engine", lambda: _build(optimized["trt-native"], out / "engine", options.sm)))

    if options.bench:
        rows.append(
            _timed("bench", lambda: _bench(checkpoint, out, options, exported.model_path, optimized.get("ort")))
        )

    if options.serve:
        served = optimized.get("ort", exported.model_path)
        with ui.status("serving the model from a Triton Inference Server"):
            rows.append(_timed("serve", lambda: _serve(served, out / "triton", checkpoint, options.dtype)))

    with atomic_file(out / "pipeline.json") as tmp:
        tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return rows


def _build(model: Path, out: Path, sm: int) -> tuple[str, str, dict[str, Any]]:
    from deploy.engine.backend import BackendMissingError
    from deploy.engine.build import BuildOptions, build_engine

    engine = out / "model.engine"
    try:
        report = build_engine(model, engine, BuildOptions(backend="tensorrt-rtx", sms=(sm,)))
    except BackendMissingError as e:
        return f"skipped: {e}", str(engine), {}
    size = ui.human_bytes(report.engine.stat().st_size)
    text = f"ok: {report.meta.backend} {report.meta.trt_version}, SM {sm}, {report.layers_total} layers, {size}"
    return text, str(report.engine), report.build_json()


def _bench(
    checkpoint: str | Path | None, out: Path, options: PipelineOptions, plain: Path, ort: Path | None
) -> tuple[str, str, dict[str, Any]]:
    """A short benchmark of every backend this machine has (the full one is `g2trt bench`)."""
    from deploy.bench.report import print_tables
    from deploy.bench.run import BenchSettings, run

    settings = BenchSettings(
        batches=(1,),
        prompts=(32,),
        new_tokens=8,
        warmup=1,
        repeats=3,
        dtype=options.dtype,
        seed=options.seed,
        kv_cache=options.kv_cache,
    )
    result, paths = run(
        checkpoint,
        settings,
        out / "bench",
        preset=options.preset,
        seed=options.seed,
        artifacts={"ort-plain": str(plain), **({"ort": str(ort)} if ort else {})},
    )
    print_tables(result, paths)
    ran = [b.backend for b in result.backends if b.status == "ok"]
    others = [f"{b.backend} {b.status}" for b in result.backends if b.status != "ok"]
    text = f"ok: {', '.join(ran)} measured" + (f"; {', '.join(others)} (reasons above)" if others else "")
    return text, str(out / "bench"), {"backends": {b.backend: b.status for b in result.backends}}


def _serve(model: Path, repo: Path, checkpoint: str | Path | None, dtype: str) -> tuple[str, str, dict[str, Any]]:
    """Package `model`, serve it, stream a greedy generation and compare it with g2trt generate's, stop."""
    if dtype == "bf16":
        return "skipped: onnxruntime's CPU provider has no bf16 kernels to serve the bf16 export", str(repo), {}
    from deploy.generate.tokenizer import find_tokenizer
    from deploy.serve.smoke import package_serve_query

    r = package_serve_query(model, repo, tokenizer=find_tokenizer(checkpoint) if checkpoint else None)
    return f"{r.status}: {r.text}", str(repo), r.details


def check(rows: list[StageRow], out: Path) -> None:
    failed = [r.stage for r in rows if r.failed]
    if failed:
        raise G2trtError(f"pipeline failed at {', '.join(failed)}; see {out / 'pipeline.json'}")

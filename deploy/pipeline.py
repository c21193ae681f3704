"""The main job: checkpoint (or the embedded tiny model) -> verified ONNX -> ... one call, one report.

Each stage writes into its own folder under the output directory and returns a row for the summary.
Later stages (graph passes, engine build, benchmark) append to `STAGES` in order.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from deploy import console as ui
from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify import TOLERANCE, Report, compare, parity_cases
from export.atomic import atomic_file
from export.checkpoint import weight_bytes
from export.onnx_export import ExportOptions, ExportResult, export_onnx
from export.weights import WeightSource, load_model, open_weights


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    preset: str = "tiny"
    seed: int = 0
    dtype: str = "fp32"
    opset: int = 18
    verify_max_len: int = 512  # cap on the "longer than window" case (real windows are 4096)


@dataclasses.dataclass
class StageRow:
    stage: str
    result: str
    seconds: float
    output: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def export_stage(source: WeightSource, out: Path, options: PipelineOptions) -> tuple[StageRow, ExportResult]:
    total = weight_bytes(source.config, options.dtype)
    with ui.weight_progress(total, "export") as advance:
        result = export_onnx(source, out / "onnx", ExportOptions(dtype=options.dtype, opset=options.opset), advance)  # type: ignore[arg-type]
    size = sum(p.stat().st_size for p in (out / "onnx").glob("model.onnx*"))
    row = StageRow("export", "ok", result.seconds, str(result.model_path), {"bytes": size})
    return row, result


def verify_stage(source: WeightSource, model_path: Path, options: PipelineOptions) -> tuple[StageRow, Report]:
    start = time.perf_counter()
    cfg = source.config
    reference = TorchRunner(load_model(source, "fp32"), name="torch fp32")
    candidate = OrtRunner(model_path, cfg, name=f"ort {options.dtype}")
    report = compare(reference, candidate, parity_cases(cfg, options.seed, options.verify_max_len))
    bound = TOLERANCE[options.dtype]
    ok = report.worst <= bound
    row = StageRow(
        "verify onnx",
        f"{'ok' if ok else 'FAIL'}: max|Δlogit| prefill {ui.fmt(report.prefill)}, decode {ui.fmt(report.decode)}"
        f" (bound {bound:g})",
        time.perf_counter() - start,
        str(model_path),
        {"prefill": report.prefill, "decode": report.decode, "bound": bound, "ok": ok},
    )
    return row, report


def run_pipeline(checkpoint: str | Path | None, out: str | Path, options: PipelineOptions) -> list[StageRow]:
    out = Path(out)
    source = open_weights(checkpoint, options.preset, options.seed)
    rows: list[StageRow] = []
    row, exported = export_stage(source, out, options)
    rows.append(row)
    with ui.status("verifying the ONNX export against PyTorch"):
        row, _ = verify_stage(source, exported.model_path, options)
    rows.append(row)
    with atomic_file(out / "pipeline.json") as tmp:
        tmp.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return rows

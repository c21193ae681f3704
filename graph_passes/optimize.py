"""`optimize(model, target, out)`: an exported g2trt model -> the graph one runtime runs fastest.

Writes OUT/model.onnx (the weights file is copied, hashed on the way: passes never touch weights),
OUT/manifest.json (stage "optimize", the target, for `ort` the execution provider it
was lowered for, what it requires of its runtime, the pass summary, the export's source), and the
pass report as OUT/passes.txt and OUT/passes.json. A pass that matches fewer sites than the model's
config implies is an error naming the missing layers (and why each was rejected).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import onnx

from export.atomic import atomic_dir
from export.config import Gemma2Config
from export.datafile import copy_hashed
from export.manifest import build_manifest, manifest_config, read_manifest, write_manifest
from graph_passes.driver import Pass
from graph_passes.errors import OptimizeError, SiteCountError
from graph_passes.graph import INTERNAL_DOMAIN, PassGraph, all_nodes
from graph_passes.report import OptimizeReport, PassReport, op_counts
from graph_passes.targets import REQUIRES, SLIDING_BUFFERS, SLIDING_FULL_MAX, TARGETS, passes_for
from trt_plugins.spec import DOMAIN as PLUGIN_DOMAIN

MODEL_FILE = "model.onnx"
REPORT_JSON = "passes.json"
REPORT_TEXT = "passes.txt"


def optimize(
    model_path: str | Path,
    target: str,
    out_dir: str | Path,
    *,
    provider: str = "cpu",
    passes: Sequence[Pass] | None = None,
    debug: bool = False,
) -> OptimizeReport:
    """Run `target`'s passes (or `passes`) on `model_path` (an export with its manifest) into `out_dir`;
    `provider` ("cpu" | "cuda") picks the `ort` target's form for that onnxruntime execution provider."""
    start = time.perf_counter()
    model_path = _model_file(Path(model_path))
    manifest = read_manifest(model_path)
    if manifest.get("stage") == "optimize":
        raise OptimizeError(
            f"{model_path}: already optimized (target {manifest.get('target')}); optimize the export instead"
        )
    quantization = manifest.get("quantization")
    if target == "ort" and passes is None:
        _check_ort_input(model_path, manifest.get("dtype"), quantization)
    cfg = manifest_config(manifest)
    chosen = tuple(passes) if passes is not None else passes_for(target, provider, quantization)
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise OptimizeError(f"{model_path}: unreadable ONNX ({e})") from None
    optimized, reports = optimize_proto(proto, chosen, cfg, target if passes is None else None, debug)

    out_dir = Path(out_dir)
    before, after = all_nodes(proto.graph), all_nodes(optimized.graph)
    with atomic_dir(out_dir) as tmp:
        onnx.save(optimized, str(tmp / MODEL_FILE))
        known = manifest.get("sha256", {})
        hashes = {n: _copy_data(model_path.parent / n, tmp / n, known.get(n)) for n in _external_files(optimized)}
        report = OptimizeReport(
            target=target,
            model_path=str(out_dir / MODEL_FILE),
            source_model=str(model_path),
            passes=reports,
            nodes_before=len(before),
            nodes_after=len(after),
            op_counts_before=op_counts([n.op_type for n in before]),
            op_counts_after=op_counts([n.op_type for n in after]),
            seconds=time.perf_counter() - start,
        )
        extra = {
            "target": target,
            "source": manifest.get("source"),
            "optimized_from": {"model": str(model_path), "sha256": manifest.get("sha256", {})},
            "passes": [{"name": p.name, "sites": p.count, "expected": _n(p.expected)} for p in reports],
            **({"quantization": quantization} if quantization else {}),
        }
        if target == "ort":
            extra["provider"] = provider
        if (target, provider) in REQUIRES:
            extra["requires"] = REQUIRES[(target, provider)]
        options = manifest.get("options") or {"dtype": manifest.get("dtype"), "opset": manifest.get("opset")}
        if options.get("kv_cache") == "inplace" and passes is None:
            extra["kv_cache_sliding"] = SLIDING_BUFFERS[target]
            if target in SLIDING_FULL_MAX:
                extra["kv_cache_sliding_full_max"] = SLIDING_FULL_MAX[target]
        write_manifest(tmp, build_manifest(cfg, tmp / MODEL_FILE, options, "optimize", hashes, **extra))
        (tmp / REPORT_JSON).write_text(report.dumps())
        (tmp / REPORT_TEXT).write_text(report.text())
    return report


def optimize_proto(
    proto: onnx.ModelProto,
    passes: Sequence[Pass],
    config: Gemma2Config | None,
    target: str | None = None,
    debug: bool = False,
) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run `passes` in order on an in-memory model; check site counts against `config` (when given)."""
    g = PassGraph.from_proto(proto)
    reports = []
    for p in passes:
        report = p(g, config, debug)
        reports.append(report)
        check_sites(report)
    out = g.to_proto()
    out.ir_version = proto.ir_version
    out.producer_name, out.producer_version = "g2trt", proto.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    _check_lowered(out, target)
    return out, reports


def _check_ort_input(model_path: Path, dtype: str | None, quantization: dict | None) -> None:
    """What onnxruntime cannot run, refused before any pass: bf16 (no CPU kernels, also none for bf16
    DequantizeLinear scales) and fp8 weights (no MatMulNBits fusion: TensorRT only)."""
    if quantization and quantization.get("scheme") == "fp8":
        raise OptimizeError(
            f"{model_path}: fp8 weights are for TensorRT (SM 89+), onnxruntime does not fuse them; use the trt / "
            "trt-native targets, or export with --quant int8 / int4 for onnxruntime"
        )
    if dtype == "bf16":
        what = f"{quantization['scheme']} with bf16 scales" if quantization else "bf16"
        raise OptimizeError(
            f"{model_path}: the ort target takes fp32 or fp16 exports, not {what} (onnxruntime's CPU provider has no "
            "bf16 kernels); export with --dtype fp16, or use the trt / trt-native targets for bf16"
        )


def check_sites(report: PassReport) -> None:
    missing = report.missing
    if not missing:
        return
    assert report.expected is not None
    shown = [f"{m} ({report.reason_for(m) or 'no candidate found'})" for m in missing[:4]]
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    raise SiteCountError(
        f"{report.name} matched {report.count} of the {len(report.expected)} sites the config implies; "
        f"missing {'; '.join(shown)}{more}"
    )


def _check_lowered(model: onnx.ModelProto, target: str | None) -> None:
    left = sorted({n.op_type for n in all_nodes(model.graph) if n.domain == INTERNAL_DOMAIN})
    if left:
        raise OptimizeError(f"internal op(s) {left} left after the passes: the pass list lacks their lowering")
    if target in ("ort", "trt-native"):
        plugins = sorted({n.op_type for n in all_nodes(model.graph) if n.domain == PLUGIN_DOMAIN})
        if plugins:
            raise OptimizeError(f"target {target}: plugin op(s) {plugins} left in the graph")


def _model_file(path: Path) -> Path:
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise OptimizeError(f"{path}: not found")
    return path


def _external_files(model: onnx.ModelProto) -> list[str]:
    names: set[str] = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    return sorted(names)


def _copy_data(src: Path, dst: Path, known_sha256: str | None) -> str:
    """Copy a weights file and return its sha256 (export.datafile: a reflink where the filesystem has
    them, else direct I/O, hashed while copied).

    Not a hard link: onnx and onnx-ir refuse external data with several links (hard-link attacks).
    """
    if not src.is_file():
        raise OptimizeError(f"{src}: external data file missing")
    return copy_hashed(src, dst, known_sha256)


def _n(expected: list[str] | None) -> int | None:
    return None if expected is None else len(expected)


__all__ = ["TARGETS", "optimize", "optimize_proto"]

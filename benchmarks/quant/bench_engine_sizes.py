"""TensorRT-RTX engine sizes of the medium model's `trt-native` graph, fp32 and quantized (int8, int4, fp8;
head quantized or float): do the weights stay compressed inside the engine?

    python benchmarks/quant/bench_engine_sizes.py [--sm 89]

Built ahead of time (no GPU) with small profiles (batch <= 2, seq <= 32, past <= 64). Sizes do not
depend on machine load. Writes engine_sizes.{json,md} beside this script (or in --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_quant import model_config  # noqa: E402

from deploy.engine.build import BuildOptions, build_engine  # noqa: E402
from export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from export.weights import RandomWeights  # noqa: E402
from graph_passes import optimize  # noqa: E402

SMALL = {"opt": {"batch": 1, "seq": 16, "past": 32}, "max": {"batch": 2, "seq": 32, "past": 64}}
VARIANTS = [
    ("fp32", True),
    ("int8", True),
    ("int8", False),
    ("int4", True),
    ("int4", False),
    ("fp8", True),
    ("fp8", False),
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config("medium")
    source = RandomWeights(cfg, seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="g2trt-engines-", dir=args.work) as tmp:
        for scheme, head in VARIANTS:
            work = Path(tmp) / f"{scheme}-{head}"
            options = ExportOptions(last_logits_only=True, quant=None if scheme == "fp32" else scheme, quant_head=head)  # type: ignore[arg-type]
            export = export_onnx(source, work / "onnx", options)
            native = optimize(export.model_path, "trt-native", work / "native")
            start = time.perf_counter()
            report = build_engine(
                native.model_path, work / "e.engine", BuildOptions("tensorrt-rtx", (args.sm,), **SMALL)
            )
            rows.append(
                {
                    "weights": scheme,
                    "head": scheme if head else "fp32",
                    "weights_file_bytes": (work / "onnx" / "model.onnx.data").stat().st_size,
                    "engine_bytes": report.meta.engine_bytes,
                    "build_s": time.perf_counter() - start,
                }
            )
            print(rows[-1], flush=True)
    from deploy.bench.report import machine_info

    return {
        "command": " ".join(["python benchmarks/quant/bench_engine_sizes.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "sm": args.sm,
        "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# TensorRT-RTX engine sizes: medium model, `trt-native`, fp32 vs quantized weights",
        "",
        f"`{res['command']}`",
        "",
        f"6 layers, hidden 512, intermediate 2048, vocab 32000; SM {res['sm']}, TensorRT-RTX "
        f"{m['versions'].get('tensorrt_rtx_cu13_bindings', '?')}, small "
        "profiles. The engine holds its weights file plus a fixed part; the float embedding (65.5 MB) stays.",
        "",
        "| weights | head | weights file | engine | engine - weights file |",
        "|---|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        fixed = (r["engine_bytes"] - r["weights_file_bytes"]) / 1e6
        lines.append(
            f"| {r['weights']} | {r['head']} | {r['weights_file_bytes'] / 1e6:.2f} MB | "
            f"{r['engine_bytes'] / 1e6:.2f} MB | {fixed:.1f} MB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sm", type=int, default=89)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_sizes.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "engine_sizes.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

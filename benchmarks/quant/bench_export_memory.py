"""Peak memory and time of quantized exports: does quantizing while the weights stream keep the export's
peak at the float export's (about two copies of the largest tensor), never all weights at once?

    python benchmarks/quant/bench_export_memory.py [--preset 2b] [--schemes fp32,int8,int4,fp8]

Each export runs in a fresh subprocess (seeded random weights, last-logits-only); its peak RSS is the
child's VmHWM (ru_maxrss would include the parent's RSS at fork). Writes export_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
from pathlib import Path
from export.config import preset
from export.weights import RandomWeights
from export.onnx_export import ExportOptions, export_onnx
name, scheme, out = sys.argv[1:4]
cfg = preset(name)
t = time.perf_counter()
export_onnx(RandomWeights(cfg), out, ExportOptions(last_logits_only=True, quant=None if scheme == "fp32" else scheme))
seconds = time.perf_counter() - t
size = sum(f.stat().st_size for f in Path(out).glob("model.onnx*"))
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
peak = int(hwm.split()[1]) / 2**20  # kB -> GiB
print(json.dumps({"seconds": seconds, "bytes": size, "params": cfg.num_params, "peak_rss_gib": peak}))
"""


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for scheme in args.schemes.split(","):
        with tempfile.TemporaryDirectory(dir=args.work) as out:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, args.preset, scheme, out], capture_output=True, text=True, cwd=ROOT
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{scheme}: {proc.stderr[-2000:]}")
        rows.append({"scheme": scheme, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    from deploy.bench.report import machine_info

    return {
        "command": " ".join(["python benchmarks/quant/bench_export_memory.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "preset": args.preset,
        "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"# Quantized export: time and peak memory, `{res['preset']}` preset",
        "",
        f"`{res['command']}`",
        "",
        f"{m['cpu']} ({m['cores']} cores), one run per row, a fresh process each (VmHWM), seeded random "
        "weights, last-logits-only, head quantized; other jobs share this machine, so times are approximate.",
        "",
        "| weights | params | time (s) | peak RSS (GiB) | files (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['scheme']} | {r['params'] / 1e9:.2f} B | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{r['bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--schemes", default="fp32,int8,int4,fp8")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_memory.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "export_memory.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""Export time, its stages and peak memory: `g2trt export` of tiny, a 2B-shaped export, and 2B + the passes.

Every measurement runs in a fresh subprocess (its wall time and peak RSS are its own). With `--before SRC`
(a checkout of an older g2trt) each row also runs on that code, interleaved with this one's, so both see
the same machine load; the load average before each run is recorded. The 2B shape is the real Gemma 2 2B
(26 layers, hidden 2304, 8/4 heads, head_dim 256, vocab 256000) with seeded random weights.

Rows:
- `g2trt export` of tiny: the CLI's wall time (interpreter start and imports included);
- trace: `trace_graph` alone (the graph, no weights) for tiny and 2B, both KV cache contracts;
- export: `export_onnx` of tiny and 2B in fp32/fp16/bf16 (in-process time, split into trace and the rest);
- export + passes: `g2trt export` of 2B fp32, then `g2trt optimize` for each target (CLI wall times);
- `--baseline`: why tiny traces slower than `torch.onnx.export` with weights in memory (static vs dynamic
  shapes, meta vs real weights), on this code only.

    python benchmarks/export/bench_export.py [--before SRC] [--baseline] [--quick] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from deploy.bench.report import machine_info  # noqa: E402

EXPORT = r"""
import json, resource, sys, time
from pathlib import Path
import export.onnx_export as oe
from export.config import preset
from export.weights import RandomWeights
name, dtype, kv, out = sys.argv[1:5]
cfg = preset(name)
stages = {"trace": 0.0}
trace = oe.trace_graph
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return trace(*a, **k)
    finally:
        stages["trace"] += time.perf_counter() - t
oe.trace_graph = timed
options = oe.ExportOptions(dtype=dtype) if kv == "dynamic" else oe.ExportOptions(dtype=dtype, kv_cache=kv)
t = time.perf_counter()
oe.export_onnx(RandomWeights(cfg), out, options)
seconds = time.perf_counter() - t
size = sum(f.stat().st_size for f in Path(out).glob("model.onnx*"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": seconds, "trace": stages["trace"], "rest": seconds - stages["trace"], "bytes": size,
                  "params": cfg.num_params, "peak_rss_gib": peak}))
"""

TRACE = r"""
import json, sys, time
import export.onnx_export as oe
from export.config import preset
name, kv = sys.argv[1:3]
options = oe.ExportOptions() if kv == "dynamic" else oe.ExportOptions(kv_cache=kv)
t = time.perf_counter()
model = oe.trace_graph(preset(name), options)
print(json.dumps({"seconds": time.perf_counter() - t, "nodes": len(model.graph)}))
"""

BASELINE = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from torch.export import Dim
from export import io_contract as io
from export.config import GLOBAL, SLIDING, preset
from export.model import Gemma2ForCausalLM
from export.onnx_export import _FlatSignature
from export.weights import RandomWeights, load_model
device, shapes = sys.argv[1:3]
cfg = preset("tiny")
if device == "meta":
    with torch.device("meta"):
        model = Gemma2ForCausalLM(cfg).eval()
else:
    model = load_model(RandomWeights(cfg), "fp32")
b, s, p = 2, 3, 5
past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, device=device)
        for _ in range(2 * cfg.num_hidden_layers)]
ids = torch.zeros(b, s, dtype=torch.int64, device=device)
args = (ids, torch.ones(b, p + s, dtype=torch.int64, device=device), ids.clone(), *past)
dynamic = None
if shapes == "dynamic":
    batch, seq = Dim(io.BATCH), Dim(io.SEQ)
    kinds = {SLIDING: Dim(io.SLIDING_PAST), GLOBAL: Dim(io.PAST)}
    cache = tuple({0: batch, 2: kinds[k]} for k in cfg.layer_types for _ in range(2))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim(io.TOTAL)}, {0: batch, 1: seq}, cache)
t = time.perf_counter()
torch.onnx.export(_FlatSignature(model), args, dynamo=True, optimize=False, opset_version=18, verbose=False,
                  dynamic_shapes=dynamic)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _env(src: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("PYTHONHASHSEED", None)
    return env


def _load() -> float:
    return os.getloadavg()[0]


def _child(src: Path, code: str, *args: str) -> dict:
    # cwd=src: `python -c` puts the working directory first on sys.path
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(src), cwd=src)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cli(src: Path, *args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, env=_env(src), cwd=src
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return {"seconds": seconds}


def measure(row: dict, src: Path, work: Path) -> dict:
    kind = row["kind"]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if kind == "cli":
        return _cli(src, "export", "--preset", row["model"], "--out", str(out))
    if kind == "trace":
        return _child(src, TRACE, row["model"], row["kv"])
    if kind == "export":
        return _child(src, EXPORT, row["model"], row["dtype"], row["kv"], str(out))
    if kind == "baseline":
        return _child(src, BASELINE, row["device"], row["shapes"])
    if kind == "passes":  # the CLI export, then each target's optimize of it
        result = {"export": _cli(src, "export", "--preset", row["model"], "--out", str(out / "onnx"))}
        for target in ("trt", "ort", "trt-native"):
            result[target] = _cli(src, "optimize", str(out / "onnx"), "--target", target, "--out", str(out / target))
            shutil.rmtree(out / target, ignore_errors=True)  # 10 GB each at 2B fp32
        ok = all("seconds" in r for r in result.values())
        result["seconds"] = sum(r["seconds"] for r in result.values()) if ok else None
        return result
    raise ValueError(kind)


def plan(quick: bool, baseline: bool) -> list[dict]:
    rows = [
        {"kind": "cli", "model": "tiny"},
        {"kind": "trace", "model": "tiny", "kv": "dynamic"},
        {"kind": "trace", "model": "tiny", "kv": "inplace"},
        {"kind": "export", "model": "tiny", "dtype": "fp32", "kv": "dynamic"},
    ]
    if not quick:
        rows += [
            {"kind": "trace", "model": "2b", "kv": "dynamic"},
            {"kind": "trace", "model": "2b", "kv": "inplace"},
            {"kind": "export", "model": "2b", "dtype": "fp32", "kv": "dynamic"},
            {"kind": "export", "model": "2b", "dtype": "fp16", "kv": "dynamic"},
            {"kind": "export", "model": "2b", "dtype": "bf16", "kv": "dynamic"},
            {"kind": "passes", "model": "2b", "dtype": "fp32"},
        ]
    if baseline:
        rows += [
            {"kind": "baseline", "device": d, "shapes": s, "before": False}
            for d, s in (("cpu", "static"), ("cpu", "dynamic"), ("meta", "static"), ("meta", "dynamic"))
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="an older g2trt checkout to measure each row on as well")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny rows only")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the .json of a run")
    args = ap.parse_args()
    if args.render_only:
        run = json.loads(args.out.with_suffix(".json").read_text())
        args.out.write_text(render(run))
        return
    codes = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for row in plan(args.quick, args.baseline):
            for label, src in codes:
                if label == "before" and row.get("before") is False:
                    continue
                load = _load()
                start = time.perf_counter()
                result = measure(row, src, Path(tmp))
                rows.append({**row, "code": label, "load": load, **result})
                print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    command = " ".join(["python", "benchmarks/export/bench_export.py", *sys.argv[1:]])
    run = {"command": command, "machine": machine_info(), "python": platform.python_version(), "rows": rows}
    run["date"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(run, indent=2) + "\n")
    args.out.write_text(render(run))


def _s(r: dict | None, key: str = "seconds") -> str:
    if r is None:
        return ""
    if "error" in r:
        return f"failed: {r['error']}"
    v = r.get(key)
    return "" if v is None else f"{v:.1f}"


def render(run: dict) -> str:
    m = run["machine"]
    rows = run["rows"]
    lines = [
        "# Export time and peak memory",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {run['python']}, {run['date']}  ",
        "One run per cell, each in a fresh process; `before` and `after` alternate row by row. `load`: the",
        "1-minute load average just before the run (this VM is shared; 2 means both cores busy elsewhere).",
        "",
    ]

    def pairs(kind: str) -> list[tuple[dict, dict | None]]:
        after = [r for r in rows if r["kind"] == kind and r["code"] == "after"]
        out = []
        for a in after:
            key = {k: v for k, v in a.items() if k in ("model", "kv", "dtype", "device", "shapes")}
            b = next((r for r in rows if r["kind"] == kind and r["code"] == "before" and _match(r, key)), None)
            out.append((a, b))
        return out

    lines += ["| what | before (s) | after (s) | load before / after |", "|---|---|---|---|"]
    for a, b in pairs("cli"):
        lines.append(f"| `g2trt export --preset {a['model']}` (wall) | {_s(b)} | {_s(a)} | {_loads(b, a)} |")
    for a, b in pairs("trace"):
        nodes = a.get("nodes", "")
        what = f"trace {a['model']}, {a['kv']} ({nodes} nodes)"
        lines.append(f"| {what} | {_s(b)} | {_s(a)} | {_loads(b, a)} |")
    for a, b in pairs("export"):
        lines.append(f"| export {a['model']} {a['dtype']} | {_s(b)} | {_s(a)} | {_loads(b, a)} |")
    for a, b in pairs("passes"):
        for part in ("export", "trt", "ort", "trt-native"):
            export = f"`g2trt export --preset {a['model']}` (wall)"
            what = export if part == "export" else f"then `optimize --target {part}`"
            lines.append(f"| {what} | {_s((b or {}).get(part)) if b else ''} | {_s(a.get(part))} | |")
        lines.append(f"| **export + the three targets** | {_s(b)} | **{_s(a)}** | {_loads(b, a)} |")
        if all("seconds" in a.get(k, {}) for k in ("export", "trt")):
            one = a["export"]["seconds"] + a["trt"]["seconds"]
            lines.append(f"| export + one target (trt) | | {one:.1f} | |")
    exports = [r for r in rows if r["kind"] == "export" and "error" not in r]
    if exports:
        lines += [
            "",
            "Exports in detail (in-process `export_onnx`; trace = `trace_graph`, "
            "rest = weights drawn, written, hashed):",
            "",
            "| model | dtype | code | total (s) | trace (s) | rest (s) | peak RSS (GiB) | files (GiB) | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in exports:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['code']} | {r['seconds']:.1f} | {r['trace']:.1f} | "
                f"{r['rest']:.1f} | {r['peak_rss_gib']:.2f} | {r['bytes'] / 2**30:.2f} | {r['load']:.1f} |"
            )
    base = [r for r in rows if r["kind"] == "baseline"]
    if base:
        lines += [
            "",
            "Why tiny traced slower than `torch.onnx.export` with weights in memory: `torch.onnx.export(dynamo=True,",
            "optimize=False)` of the 4-layer tiny model, this code's model:",
            "",
            "| weights | shapes | seconds | load |",
            "|---|---|---|---|",
        ]
        for r in base:
            lines.append(f"| {r['device']} | {r['shapes']} | {_s(r)} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def _match(r: dict, key: dict) -> bool:
    return all(r.get(k) == v for k, v in key.items())


def _loads(b: dict | None, a: dict) -> str:
    return f"{b['load']:.1f} / {a['load']:.1f}" if b else f"{a['load']:.1f}"


if __name__ == "__main__":
    main()

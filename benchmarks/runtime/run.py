"""Runtime benchmarks: `g2trt bench` on the tiny preset and a medium random model, and the KV memory the
windowed cache saves at prompt 2048 with window 128.

    python benchmarks/runtime/run.py                  # the committed setting (run on a quiet machine)
    python benchmarks/runtime/run.py --quick          # a smoke run of every part, small settings
    python benchmarks/runtime/run.py --only kv        # one part: tiny | medium | kv

Models (seeded RandomWeights, nothing downloaded):
  tiny    the `tiny` preset (4 layers, hidden 64, vocab 1024, window 16)
  medium  6 layers, hidden 512, 8 heads / 4 KV heads of 64, FFN 2048, vocab 32000, window 4096
          (the model of benchmarks/ort_targets, so the two benchmarks describe the same graph)
  kv      the medium model with window 128 and its own lm_head (greedy output varies, so the token
          check between the two caches means something)

bench: backends torch, ort-plain, ort, trt, ort-genai; batch 1 and 4; prompt 128 and 512; 64 new tokens;
1 warm-up + 5 timed rounds, interleaved (deploy/bench/run.py says exactly how). Results go to
results/<machine>/{tiny,medium}/bench.{json,md,png} and results/<machine>/kv_memory.{json,md}, with
the command line and machine in each JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from deploy.bench.report import machine_info, print_tables  # noqa: E402
from deploy.bench.run import BenchSettings  # noqa: E402
from deploy.bench.run import run as run_bench  # noqa: E402
from deploy.generate import kv_cache  # noqa: E402
from export.atomic import atomic_file  # noqa: E402
from export.config import Gemma2Config, preset  # noqa: E402

MEDIUM = preset("tiny").replace(
    num_hidden_layers=6,
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    query_pre_attn_scalar=64,
    vocab_size=32000,
    sliding_window=4096,
    max_position_embeddings=8192,
)
KV_MODEL = MEDIUM.replace(sliding_window=128, tie_word_embeddings=False)


def machine_tag() -> str:
    info = machine_info()
    gpu = info.get("gpu")
    name = gpu or f"{info.get('cpu') or platform.machine()}-{info.get('cores')}c"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def bench(name: str, cfg: Gemma2Config | None, settings: BenchSettings, out: Path, command: str) -> None:
    result, paths = run_bench(None, settings, out / name, preset="tiny", config=cfg, seed=0)
    raw = json.loads(paths["json"].read_text())
    raw["command"] = command
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(raw, indent=2) + "\n")
    print_tables(result, paths)


def kv_memory(prompt: int, new: int, out: Path, command: str, threads: int) -> dict[str, Any]:
    """KV bytes held by the full and the windowed cache after `prompt` + `new` tokens, batch 1, on the
    plain export in onnxruntime; plus the greedy tokens of each (they must be identical)."""
    import tempfile

    import numpy as np

    from deploy.generate.loop import GenerationConfig, generate
    from deploy.runners.ort_runner import OrtRunner
    from export.onnx_export import ExportOptions, export_onnx
    from export.weights import RandomWeights

    cfg = KV_MODEL
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt)).tolist()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="g2trt-kv-") as work:
        model = export_onnx(RandomWeights(cfg, seed=1), Path(work), ExportOptions(dtype="fp32")).model_path
        runner = OrtRunner(model, cfg, threads=threads)
        for policy in ("full", "window"):
            config = GenerationConfig(max_new_tokens=new, stop_tokens=(), cache=policy)  # type: ignore[arg-type]
            g = generate(runner, ids, config)
            total = prompt + new - 1
            rows[policy] = {
                "kv_bytes_held": g.kv_bytes,
                "kv_bytes_expected": kv_cache.expected_bytes(cfg, 1, total, policy, 4),  # type: ignore[arg-type]
                "kv_peak_bytes_between_steps": g.kv_peak_bytes,
                "decode_tokens_per_s": g.decode_tokens_per_s,
                "tokens": g.tokens[0],
            }
    full, window = rows["full"], rows["window"]
    report = {
        "format": "g2trt-kv-memory/1",
        "command": command,
        "machine": machine_info(),
        "model": {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "rope_parameters")},
        "prompt": prompt,
        "new_tokens": new,
        "batch": 1,
        "dtype": "fp32",
        "measures": (
            "kv_bytes_held: bytes of the K/V arrays the generation loop holds after the last step (summed "
            "nbytes of what it feeds the next step); kv_bytes_expected: the same from the formula; "
            "kv_peak_bytes_between_steps: the most it held between any two steps. Not included: each step's "
            "presents while the graph returns them (past + new entries, before trimming; at prefill that is "
            "the whole prompt for every layer, whatever the policy). decode_tokens_per_s: one run each, "
            "indicative only."
        ),
        "policies": rows,
        "saved_bytes": full["kv_bytes_held"] - window["kv_bytes_held"],
        "held_ratio": window["kv_bytes_held"] / full["kv_bytes_held"],
        "tokens_identical": full["tokens"] == window["tokens"],
    }
    with atomic_file(out / "kv_memory.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(out / "kv_memory.md") as tmp:
        tmp.write_text(kv_markdown(report))
    print(kv_markdown(report))
    return report


def kv_markdown(r: dict[str, Any]) -> str:
    mib = 2**20
    m = r["model"]
    lines = [
        f"# KV cache memory: prompt {r['prompt']} + {r['new_tokens']} new tokens, window {m['sliding_window']}",
        "",
        f"{m['num_hidden_layers']} layers ({', '.join(t.split('_')[0] for t in m['layer_types'])}), "
        f"{m['num_key_value_heads']} KV heads x {m['head_dim']}, fp32, batch 1; onnxruntime CPU, plain export.",
        "",
        "| cache | KV held MiB | expected MiB | peak between steps MiB | decode tok/s |",
        "|---|---|---|---|---|",
    ]
    for policy, row in r["policies"].items():
        lines.append(
            f"| {policy} | {row['kv_bytes_held'] / mib:.2f} | {row['kv_bytes_expected'] / mib:.2f} | "
            f"{row['kv_peak_bytes_between_steps'] / mib:.2f} | {row['decode_tokens_per_s']:.1f} |"
        )
    lines += [
        "",
        f"Saved: {r['saved_bytes'] / mib:.2f} MiB ({1 - r['held_ratio']:.1%} of the full cache); "
        f"greedy tokens identical: {r['tokens_identical']}.",
        "",
        r["measures"],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings: checks every part runs (minutes)")
    ap.add_argument("--only", choices=("tiny", "medium", "kv"), action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, help="results directory (default: results/<machine> beside this script)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--cooldown",
        type=float,
        default=1.0,
        help="idle seconds before each trial (default 1.0: as the issue benchmarks give onnxruntime-genai)",
    )
    args = ap.parse_args()
    command = "python benchmarks/runtime/run.py " + " ".join(sys.argv[1:])
    out = args.out or HERE / "results" / (machine_tag() + ("-quick" if args.quick else ""))
    parts = args.only or ["tiny", "medium", "kv"]
    if args.quick:
        settings = BenchSettings(batches=(1, 2), prompts=(16, 64), new_tokens=8, warmup=1, repeats=args.repeats or 2,
                                 threads=args.threads, cooldown_s=min(args.cooldown, 0.05))  # fmt: skip
        kv_prompt, kv_new = 512, 8
    else:
        settings = BenchSettings(batches=(1, 4), prompts=(128, 512), new_tokens=64, warmup=1,
                                 repeats=args.repeats or 5, threads=args.threads, cooldown_s=args.cooldown)  # fmt: skip
        kv_prompt, kv_new = 2048, 32
    start = time.perf_counter()
    if "tiny" in parts:
        bench("tiny", None, settings, out, command)
    if "medium" in parts:
        bench("medium", MEDIUM, settings, out, command)
    if "kv" in parts:
        out.mkdir(parents=True, exist_ok=True)
        kv_memory(kv_prompt, kv_new, out, command, args.threads or 0)
    print(f"done in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()

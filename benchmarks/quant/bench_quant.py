"""Weight-only quantization on onnxruntime CPU: g2trt's `ort` target in fp32 / int8 / int4 vs onnxruntime-genai
(`-p fp32`, `-p int4`) on the same random weights: decode and prefill latency, quality, file size, peak RSS.

    python benchmarks/quant/bench_quant.py                      # medium model, the committed results
    python benchmarks/quant/bench_quant.py --model 2b --rounds 5 --formats int8,int4 --genai int4
    python benchmarks/quant/bench_quant.py --quick              # a smoke run on a small model

Latency: batch 1, a `--prompt`-token prompt (prefill + the argmax of its last logits), then `--new - 1`
single-token steps; g2trt graphs through g2trt's runtime: by default the in-place KV cache
(`OrtInplaceRunner`: one buffer bound as past and present), with `--kv-cache dynamic` an onnxruntime
session through IOBinding (the cache stays in onnxruntime values, copied into each present); genai
models in genai's own Generator. Every model runs with the same intra-op
thread count; models are interleaved round by round (the first model rotates), and every trial starts
after `--cooldown` idle seconds so no spinning thread pool of the previous one bleeds into it. Medians.
The g2trt export is last-logits-only (what generation runs); genai's graph computes logits for every
prompt position (its design; it cannot be turned off).

Quality: teacher-forced over `--quality-tokens` seeded random tokens against the fp32 PyTorch model:
top-1 agreement, mean KL, max / mean |logit diff| (deploy/verify/quality.py). g2trt graphs are fed
token by token through their cache (they return last logits only), genai models in one prefill.
Random weights are a weak signal (flat next-token distributions flip on small errors).

Peak RSS: each model alone in a fresh process (load the session, run one trial), its VmHWM; the
same process with nothing loaded is the baseline (twice: with onnxruntime and genai imported, and also
with what g2trt's runner imports, torch included). Writes results.json and results.md (or
results_<model>.*) beside this script or in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.timed_models import cpu_session, interleaved_trials, time_floor_rows  # noqa: E402
from export.config import Gemma2Config, preset  # noqa: E402

MODELS = {  # the issue's medium model and a 2B-shaped one (real Gemma 2 2B widths)
    "medium": dict(
        num_hidden_layers=6,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        vocab_size=32000,
        sliding_window=128,
        max_position_embeddings=8192,
    ),
    "quick": dict(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        vocab_size=2048,
        sliding_window=32,
        max_position_embeddings=1024,
    ),
}


def model_config(name: str) -> Gemma2Config:
    if name == "2b":
        return preset("2b")
    base = preset("tiny")
    spec = dict(MODELS[name])
    layers = int(spec["num_hidden_layers"])
    kinds = tuple(base.layer_types[i % 2] for i in range(layers))  # sliding, global, ... as Gemma 2
    return base.replace(**spec, layer_types=kinds)


# --- the runtimes ------------------------------------------------------------------------------------


def ours(path: Path, cfg: Gemma2Config, threads: int, kv_cache: str) -> Any:
    from benchmarks.timed_models import InplaceModel, OrtModel

    name = f"g2trt {path.parent.name}"
    return InplaceModel(name, path, cfg, threads) if kv_cache == "inplace" else OrtModel(name, path, cfg, threads)


def _model(b: Built, cfg: Gemma2Config, threads: int, kv_cache: str) -> Any:
    return ours(b.path, cfg, threads, kv_cache) if b.kind == "ours" else _genai(b.path, threads)


def _genai(model_dir: Path, threads: int) -> Any:
    from deploy.bench.genai_peer import GenaiModel  # torch-free: the peak-RSS children measure it alone

    return GenaiModel(model_dir, threads)


class FloorModel:
    """The model's weight products and nothing else, quantized as g2trt quantizes them: per layer q, k, v, o,
    gate, up, down as DequantizeLinear -> MatMul (MatMulNBits once onnxruntime fuses them) chained one after
    the other, then the head on the last row. No norm, attention or activation: what any graph of these
    weights spends at least per step on this machine, with onnxruntime's MatMulNBits."""

    def __init__(self, cfg: Gemma2Config, scheme: str, threads: int, seed: int) -> None:
        from onnx import TensorProto, helper, numpy_helper

        from export.quantize import QuantSpec, quantize

        rng = np.random.default_rng(seed)
        spec = QuantSpec(scheme)  # type: ignore[arg-type]
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        inits, nodes = [], []

        def matmul(x: str, k: int, n: int, name: str) -> str:
            codes, scale = quantize((rng.standard_normal((k, n)) * 0.02).astype(np.float32), spec, np.float32)
            if scheme == "int4":
                flat = (codes.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
                t = TensorProto(name=f"{name}.w", data_type=TensorProto.INT4, dims=[k, n])
                t.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            else:
                t = numpy_helper.from_array(codes, f"{name}.w")
            inits.extend([t, numpy_helper.from_array(scale, f"{name}.s")])
            nodes.append(
                helper.make_node("DequantizeLinear", [f"{name}.w", f"{name}.s"], [f"{name}.d"], axis=0, block_size=32)
            )
            nodes.append(helper.make_node("MatMul", [x, f"{name}.d"], [name]))
            return name

        x = "x"
        for i in range(cfg.num_hidden_layers):
            query = matmul(x, d, q, f"l{i}.q")
            matmul(x, d, kv, f"l{i}.k")
            matmul(x, d, kv, f"l{i}.v")
            o = matmul(query, q, d, f"l{i}.o")
            gate, up = matmul(o, d, f, f"l{i}.gate"), matmul(o, d, f, f"l{i}.up")
            nodes.append(helper.make_node("Mul", [gate, up], [f"l{i}.act"]))
            x = matmul(f"l{i}.act", f, d, f"l{i}.down")
        consts = (("last", [-1]), ("end", [2**62]), ("axis0", [0]))
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in consts]
        nodes.append(helper.make_node("Slice", [x, "last", "end", "axis0"], ["rows"]))
        matmul("rows", d, cfg.vocab_size, "logits")
        graph = helper.make_graph(
            nodes,
            "floor",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", d])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        self.session = cpu_session(model.SerializeToString(), threads)
        self.x = rng.standard_normal((8192, d)).astype(np.float32)

    def trial(self, input_ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
        return time_floor_rows(self.session, self.x, input_ids.shape[1], new_tokens)


# --- building the models -----------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    name: str
    kind: str  # "ours" | "genai"
    path: Path  # model.onnx (ours) or the genai model directory
    seconds: float  # export + optimize, or the genai build

    @property
    def files(self) -> list[Path]:
        directory = self.path.parent if self.kind == "ours" else self.path
        return sorted(p for p in directory.iterdir() if p.name.startswith("model.onnx"))


def build_models(args: argparse.Namespace, cfg: Gemma2Config, work: Path) -> dict[str, Built]:
    from export.onnx_export import ExportOptions, export_onnx
    from export.weights import RandomWeights
    from graph_passes import optimize

    source = RandomWeights(cfg, seed=args.seed)
    built: dict[str, Built] = {}
    for fmt in args.formats:
        start = time.perf_counter()
        quant = None if fmt == "fp32" else fmt
        options = ExportOptions(last_logits_only=True, kv_cache=args.kv_cache, quant=quant, quant_head=True)
        export = export_onnx(source, work / f"export-{fmt}", options)
        path = Path(optimize(export.model_path, "ort", work / f"ort-{fmt}").model_path)
        built[f"g2trt {fmt}"] = Built(f"g2trt {fmt}", "ours", path, time.perf_counter() - start)
        print(f"built g2trt {fmt} in {built[f'g2trt {fmt}'].seconds:.0f} s", flush=True)
    if args.genai:
        from deploy.bench.genai_peer import build, write_hf_checkpoint

        hf = write_hf_checkpoint(source, work / "hf")
        for precision in args.genai:
            start = time.perf_counter()
            path = build(hf, work / f"genai-{precision}", precision=precision)
            built[f"genai {precision}"] = Built(f"genai {precision}", "genai", path, time.perf_counter() - start)
            print(f"built genai {precision} in {built[f'genai {precision}'].seconds:.0f} s", flush=True)
    return built


# --- measurements ------------------------------------------------------------------------------------


def quality(args: argparse.Namespace, cfg: Gemma2Config, built: dict[str, Built]) -> dict[str, Any]:
    """Teacher-forced quality of every model against the fp32 PyTorch model, on one token sequence."""
    from deploy.bench.genai_peer import teacher_forced_logits
    from deploy.runners.ort_runner import OrtInplaceRunner, OrtRunner
    from deploy.runners.torch_runner import TorchRunner
    from deploy.verify.quality import compare_logits, position_logits, quality_ids
    from export.weights import RandomWeights, load_model

    ids = quality_ids(cfg, args.quality_tokens, args.seed)
    reference = TorchRunner(load_model(RandomWeights(cfg, seed=args.seed), "fp32"))
    ref = position_logits(reference, ids, stepwise=False)
    del reference
    out = {}
    for name, b in built.items():
        start = time.perf_counter()
        if b.kind == "ours":
            runner = OrtInplaceRunner if args.kv_cache == "inplace" else OrtRunner
            got = position_logits(runner(b.path, cfg, threads=args.threads), ids, stepwise=True)
        else:
            got = teacher_forced_logits(b.path, ids, args.threads)
        q = compare_logits(ref, got)
        se = (q.top1_agreement * (1 - q.top1_agreement) / q.tokens) ** 0.5
        out[name] = {**q.to_json(), "agreement_standard_error": se}
        print(f"quality {name}: {q} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def latency(args: argparse.Namespace, cfg: Gemma2Config, built: dict[str, Built]) -> dict[str, Any]:
    models: dict[str, Any] = {n: _model(b, cfg, args.threads, args.kv_cache) for n, b in built.items()}
    for scheme in args.floors:
        models[f"{FLOOR} {scheme}"] = FloorModel(cfg, scheme, args.threads, args.seed)
    prompt = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, size=(1, args.prompt), dtype=np.int64)
    trials = interleaved_trials(
        models,
        prompt,
        args.new,
        args.rounds,
        args.cooldown,
        idle_after_warmup=False,
        after_round=lambda r: print(f"round {r + 1}/{args.rounds} done", flush=True),
    )
    ttft, tokens = trials.ttft, trials.tokens
    # one value per trial: decode steps are correlated
    step = {n: [statistics.median(trial) for trial in steps] for n, steps in trials.steps.items()}
    return {
        n: {
            "prefill_ms": 1e3 * statistics.median(ttft[n]),
            "decode_ms_per_token": 1e3 * statistics.median(step[n]),
            "prefill_ms_all": [round(1e3 * t, 3) for t in ttft[n]],
            "decode_ms_all": [round(1e3 * t, 4) for t in step[n]],
            "tokens": tokens.get(n),
        }
        for n in models
    }


FLOOR = "floor: weight products only,"


def peak_rss(args: argparse.Namespace, cfg: Gemma2Config, built: dict[str, Built]) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that loads one model and runs one trial. Baselines, nothing loaded:
    "baseline" (onnxruntime and genai imported) and "baseline g2trt runner" (also g2trt's onnxruntime runner
    module and the plugin spec its graph check reads; torch only where they still pull it in)."""
    out = {}
    for name, b in [("baseline", None), ("baseline g2trt runner", None), *built.items()]:
        spec = {**_child_spec(args, cfg, b), "runner_imports": name == "baseline g2trt runner"}
        cmd = [sys.executable, __file__, "--rss-child", json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rss child for {name} failed: {done.stderr[-2000:]}")
        out[name] = float(done.stdout.strip().splitlines()[-1])
        print(f"peak RSS {name}: {out[name]:.0f} MiB", flush=True)
    return out


def _child_spec(args: argparse.Namespace, cfg: Gemma2Config, b: Built | None) -> dict[str, Any]:
    run = {"threads": args.threads, "prompt": args.prompt, "new": args.new, "seed": args.seed, "kv": args.kv_cache}
    return {"kind": b.kind if b else None, "path": str(b.path) if b else None, "config": dataclasses.asdict(cfg), **run}


def rss_child(spec_json: str) -> None:
    import onnxruntime  # noqa: F401  (the baseline imports the runtimes too)
    import onnxruntime_genai  # noqa: F401

    spec = json.loads(spec_json)
    if spec.get("runner_imports"):
        import deploy.runners.ort_runner  # noqa: F401
        import trt_plugins.spec  # noqa: F401
    raw = spec["config"]
    cfg = Gemma2Config(**{**raw, "layer_types": tuple(raw["layer_types"]), "eos_token_id": tuple(raw["eos_token_id"])})
    if spec["kind"] is not None:
        path, threads = Path(spec["path"]), spec["threads"]
        model = ours(path, cfg, threads, spec["kv"]) if spec["kind"] == "ours" else _genai(path, threads)
        rng = np.random.default_rng(spec["seed"])
        model.trial(rng.integers(3, cfg.vocab_size, size=(1, spec["prompt"]), dtype=np.int64), spec["new"])
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and so includes the parent's RSS at fork
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)  # kB


# --- report ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config(args.model)
    with tempfile.TemporaryDirectory(prefix="g2trt-quant-", dir=args.work) as tmp:
        built = build_models(args, cfg, Path(tmp))
        sizes = {n: sum(f.stat().st_size for f in b.files) for n, b in built.items()}
        qual = quality(args, cfg, built) if args.quality_tokens else {}
        rss = peak_rss(args, cfg, built)
        lat = latency(args, cfg, built)
    rows: dict[str, dict[str, Any]] = {}
    for n in lat:
        rows[n] = dict(lat[n])
        if n in built:
            rows[n].update(file_bytes=sizes[n], peak_rss_mib=rss[n], build_s=built[n].seconds)
        if n in qual:
            rows[n]["quality"] = qual[n]
    for ref in [r for r in ("genai int4", "genai fp32") if r in rows]:
        for row in rows.values():
            row[f"prefill_vs_{ref}"] = row["prefill_ms"] / rows[ref]["prefill_ms"]
            row[f"decode_vs_{ref}"] = row["decode_ms_per_token"] / rows[ref]["decode_ms_per_token"]
    from deploy.bench.report import machine_info

    return {
        "command": " ".join(["python benchmarks/quant/bench_quant.py", *sys.argv[1:]]),
        "machine": {**machine_info(), "load_avg_at_start": args.load_at_start, "load_avg_at_end": os.getloadavg()},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "layer_types"},
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "rss_baseline_mib": rss["baseline"],
        "rss_baseline_g2trt_runner_mib": rss["baseline g2trt runner"],
        "results": rows,
    }


SETTINGS = (
    "model",
    "kv_cache",
    "prompt",
    "new",
    "rounds",
    "threads",
    "cooldown",
    "quality_tokens",
    "seed",
    "formats",
    "genai",
    "floors",
)


def markdown(res: dict[str, Any]) -> str:
    s, c, m = res["settings"], res["config"], res["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_avg_at_start"])
    lines = [
        "# Weight-only quantization on onnxruntime CPU: g2trt `ort` target vs onnxruntime-genai",
        "",
        f"`{res['command']}`",
        "",
        f"Model: random Gemma 2 ({s['model']}), {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, head_dim {c['head_dim']}, "
        f"intermediate {c['intermediate_size']}, vocab {c['vocab_size']}, window {c['sliding_window']}; "
        f"g2trt export last-logits-only, {s['kv_cache']} KV cache, `ort` target, head quantized (as genai's "
        "`-p int4`), block 32. "
        f"Batch 1, prompt {s['prompt']}, {s['new']} new tokens, {s['threads']} intra-op threads for every model, "
        f"{s['rounds']} interleaved rounds, {s['cooldown']} s idle before each trial; medians (decode: the median "
        f"of each trial's per-token median).",
        f"Machine: {m['cpu']} ({m['cores']} cores), onnxruntime {m['versions'].get('onnxruntime')}, "
        f"onnxruntime-genai {m['versions'].get('onnxruntime-genai')}; load average at start {load}, at end "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_end'])} (other jobs share this machine).",
        "",
        "| model | prefill ms | decode ms/token | prefill / genai int4 | decode / genai int4 | file | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["results"].items():
        ratio = [f"{r[k]:.2f}" if k in r else "-" for k in ("prefill_vs_genai int4", "decode_vs_genai int4")]
        size = f"{r['file_bytes'] / 2**20:.1f} MiB" if "file_bytes" in r else "-"
        rss = f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else "-"
        lines.append(
            f"| {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {ratio[0]} | {ratio[1]} | "
            f"{size} | {rss} |"
        )
    lines += [
        "",
        f"Peak RSS is of a fresh process that loads the one model and runs one trial; the same process with "
        f"nothing loaded peaks at {res['rss_baseline_mib']:.0f} MiB, and at "
        f"{res.get('rss_baseline_g2trt_runner_mib', float('nan')):.0f} MiB with what g2trt's onnxruntime runner "
        f"imports. `{FLOOR} int4` is the "
        "model's int4 weight "
        "products alone (DequantizeLinear -> MatMul chained, fused to MatMulNBits, head on the last row): a floor "
        "for any graph of these weights in onnxruntime on this machine.",
        "",
    ]
    if any("quality" in r for r in res["results"].values()):
        tokens = s["quality_tokens"]
        lines += [
            f"Quality, teacher-forced over {tokens} seeded random tokens against the fp32 PyTorch model (random "
            "weights are a weak signal: their next-token distributions are flat, so small errors flip the argmax "
            "far more often than on a trained checkpoint):",
            "",
            "| model | top-1 agreement | ± s.e. | mean KL (nats) | max \\|Δlogit\\| | mean \\|Δlogit\\| |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in res["results"].items():
            q = r.get("quality")
            if q:
                lines.append(
                    f"| {name} | {q['top1_agreement']:.2%} | {q['agreement_standard_error']:.2%} | "
                    f"{q['mean_kl']:.3g} | {q['max_abs_diff']:.3g} | {q['mean_abs_diff']:.3g} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium", choices=["medium", "2b", "quick"])
    ap.add_argument("--formats", default="fp32,int8,int4", help="g2trt formats: fp32, int8, int4")
    ap.add_argument(
        "--kv-cache", default="inplace", choices=["inplace", "dynamic"], help="g2trt's KV cache contract (runtime)"
    )
    ap.add_argument("--genai", default="fp32,int4", help="onnxruntime-genai precisions ('' for none)")
    ap.add_argument("--floors", default="int4", help="weight-product floors to time: int4, int8 ('' for none)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32, help="new tokens per trial (prefill's + decode steps)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cooldown", type=float, default=1.0, help="idle seconds before each trial")
    ap.add_argument("--quality-tokens", type=int, default=512, help="0 skips the quality table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small model, few rounds: checks the script runs")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    args.formats = [f for f in args.formats.split(",") if f]
    args.genai = [p for p in args.genai.split(",") if p]
    args.floors = [p for p in args.floors.split(",") if p]
    if args.quick:
        args.model, args.prompt, args.new, args.rounds, args.quality_tokens, args.cooldown = "quick", 32, 8, 2, 64, 0.1
    args.load_at_start = os.getloadavg()
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = {"medium": "results", "quick": "results_quick"}.get(args.model, f"results_{args.model}")
    stem += "" if args.kv_cache == "inplace" else "_dynamic"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""Every check g2trt can run on a CUDA machine, in one script, in under 8 minutes, into one results file.

    python benchmarks/gpu_check.py                        # on a GPU: writes benchmarks/gpu_check/<device>.{json,md}
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out /tmp/smoke   # CPU: the script itself (CI)

Sections; a failing check is a row (with its error), never the end of the run, and what this machine
lacks is a row "skipped" with the reason:

1. device: GPU, compute capability, torch / triton / onnxruntime versions, providers, TensorRT flavours.
2. kernels vs their PyTorch references on the GPU, at Gemma 2 2B's shapes: SoftCap, SandwichRMSNorm,
   SlidingWindowAttention (dynamic cache) and SlidingWindowAttentionInplace (in-place cache: ring wrap,
   prompt longer than the ring, rows at different positions); fp32, fp16 and bf16 (bf16 attention runs
   here for the first time: Triton's CPU interpreter cannot multiply bf16). Tolerances are those of
   tests/trt_plugins/kernels_interpreted.py.
3. the PyTorch model on the GPU: the in-place contract equals the dynamic one (tiny preset, batch 3 with
   left padding, a ring that wraps) in fp32, and greedy tokens equal the CPU's.
4. kernel timings: benchmarks/kernels/bench_kernels.py --quick (a subprocess; its rows are embedded).
5. onnxruntime's CUDA provider, where this onnxruntime has it: the in-place `ort` target lowered for CUDA
   (`--provider cuda`) generates the PyTorch model's greedy tokens.
6. TensorRT, where importable: an in-place trt-native engine for this GPU, run by TrtInplaceRunner
   (greedy tokens = PyTorch's; decode step time with and without CUDA-graph replay).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {"fp32": (1e-5, 1e-5), "fp16": (1e-3, 1e-3), "bf16": (8e-3, 8e-3)}
ATTN_TOL = {"fp32": (3e-5, 3e-5), "fp16": (2e-3, 2e-3), "bf16": (2e-2, 2e-2)}  # vs the fp32 reference, rounded
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Row:
    section: str
    check: str
    status: str  # "ok", "FAIL", "skipped", "error"
    value: str = ""  # the measured number(s)
    note: str = ""
    seconds: float = 0.0


class Skip(Exception):
    """What this machine lacks for a check."""


def run_check(rows: list[Row], section: str, check: str, fn: Callable[[], tuple[bool, str]]) -> None:
    start = time.perf_counter()
    try:
        ok, value = fn()
        rows.append(Row(section, check, "ok" if ok else "FAIL", value, seconds=time.perf_counter() - start))
    except Skip as e:
        rows.append(Row(section, check, "skipped", note=str(e), seconds=time.perf_counter() - start))
    except Exception as e:  # a broken check is a row
        last = traceback.extract_tb(e.__traceback__)[-1]
        first = str(e).splitlines()[0][:200] if str(e) else ""
        note = f"{type(e).__name__}: {first} ({Path(last.filename).name}:{last.lineno})"
        rows.append(Row(section, check, "error", note=note, seconds=time.perf_counter() - start))
    print(f"[{rows[-1].status}] {section} / {check} {rows[-1].value} {rows[-1].note}", flush=True)


# --- 1. device --------------------------------------------------------------------------------------------


def device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "smoke": SMOKE}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    try:
        import onnxruntime as ort

        facts["onnxruntime"] = ort.__version__
        facts["providers"] = ort.get_available_providers()
    except ImportError:
        facts["onnxruntime"] = None
    for module in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            facts[module] = __import__(module).__version__
        except Exception as e:  # ImportError, or a wheel whose libraries are missing
            facts[module] = f"not importable ({type(e).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"sm_{props.major}{props.minor}", cuda=torch.version.cuda)
        facts["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        facts["device"] = "cpu (smoke)" if SMOKE else "no CUDA device"
    return facts


# --- 2. kernels vs references ------------------------------------------------------------------------------


def close(got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]) -> tuple[bool, float]:
    err = (got.float() - ref.float()).abs()
    ok = bool((err <= tol[0] + tol[1] * ref.float().abs()).all()) and bool(torch.isfinite(got.float()).all())
    return ok, float(err.max())


def kernel_checks(rows: list[Row], dev: str, quick: bool) -> None:
    from trt_plugins import attention, attention_inplace, sandwich_rmsnorm, softcap
    from trt_plugins.kernels import attention as k_attention
    from trt_plugins.kernels import attention_inplace as k_inplace
    from trt_plugins.kernels import sandwich_rmsnorm as k_norm
    from trt_plugins.kernels import softcap as k_softcap

    hidden, h, kv, hd, window = (2304, 8, 4, 256, 4096) if not quick else (64, 4, 2, 32, 16)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    for name in DT if not SMOKE else ("fp32",):
        dt = DT[name]

        def softcap_check(dt: torch.dtype = dt, name: str = name) -> tuple[bool, str]:
            x = randn(4, 256000 if not quick else 1024, dtype=dt) * 40
            ok, err = close(k_softcap.launch(x, cap=30.0), softcap.reference(x, cap=30.0), TOL[name])
            return ok, f"max |Δ| {err:.2e}"

        def norm_check(dt: torch.dtype = dt, name: str = name) -> tuple[bool, str]:
            x, res = randn(2, 64, hidden, dtype=dt), randn(2, 64, hidden) * 50
            w1, w2 = randn(hidden) * 0.1, randn(hidden) * 0.1
            got = k_norm.launch(x, res, w1, w2, epsilon=1e-6)
            ref = sandwich_rmsnorm.reference(x, res, w1, w2, epsilon=1e-6)
            results = [
                close(a, b, TOL[name] if a.dtype != torch.float32 else TOL["fp32"])
                for a, b in zip(got, ref, strict=True)
            ]
            return all(r[0] for r in results), "max |Δ| " + ", ".join(f"{r[1]:.2e}" for r in results)

        def attention_check(dt: torch.dtype = dt, name: str = name, decode: bool = False) -> tuple[bool, str]:
            b, s, p = (2, 1, 300) if decode else (2, 128, 0)
            attrs = dict(num_heads=h, kv_heads=kv, head_dim=hd, scale=hd**-0.5, softcap=50.0, window=window)
            q, k, v = randn(b, h, s, hd, dtype=dt), randn(b, kv, s, hd, dtype=dt), randn(b, kv, s, hd, dtype=dt)
            pk, pv = randn(b, kv, p, hd, dtype=dt), randn(b, kv, p, hd, dtype=dt)
            mask = torch.ones(b, p + s, dtype=torch.int64, device=dev)
            mask[1, :3] = 0
            got = k_attention.launch(q, k, v, pk, pv, mask, **attrs)
            ref = attention.reference(*(t.float() for t in (q, k, v, pk, pv)), mask, **attrs)
            live = mask[:, -s:].bool()  # padded queries are undefined by contract
            ok, err = close(got[0].transpose(1, 2)[live], ref[0].to(dt).transpose(1, 2)[live], ATTN_TOL[name])
            exact = all(torch.equal(a, b_.to(dt)) for a, b_ in zip(got[1:], ref[1:], strict=True))
            return ok and exact, f"max |Δ| {err:.2e}, presents exact {exact}"

        def inplace_check(dt: torch.dtype = dt, name: str = name, case: str = "prompt") -> tuple[bool, str]:
            """Ring wrap and rows at different positions (decode), or a prompt longer than the ring."""
            ring = min(window, 64 if quick else 4096)
            b, s, c, firsts = {
                "prompt": (2, ring + 37, ring, [-3, 0]),  # longer than the ring, one row padded
                "decode": (3, 1, ring, [5, ring + 17, 3 * ring + 2]),  # rows apart, two wrapped
            }[case]
            attrs = dict(num_heads=h, kv_heads=kv, head_dim=hd, scale=hd**-0.5, softcap=50.0, window=ring)
            pos = torch.stack([torch.arange(s) + f for f in firsts]).to(dev)
            q, k, v = randn(b, h, s, hd, dtype=dt), randn(b, kv, s, hd, dtype=dt), randn(b, kv, s, hd, dtype=dt)
            pk, pv = randn(b, kv, c, hd, dtype=dt), randn(b, kv, c, hd, dtype=dt)
            rk, rv = pk.float().clone(), pv.float().clone()
            got = k_inplace.launch(q, k, v, pk, pv, pos, **attrs)
            ref = attention_inplace.reference(q.float(), k.float(), v.float(), rk, rv, pos, **attrs)
            live = pos >= 0  # padding rows are undefined by contract
            ok, err = close(got[0].transpose(1, 2)[live], ref[0].to(dt).transpose(1, 2)[live], ATTN_TOL[name])
            exact = torch.equal(pk, rk.to(dt)) and torch.equal(pv, rv.to(dt))
            return ok and exact, f"max |Δ| {err:.2e}, cache write exact {exact}"

        checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
            (f"SoftCap {name}", softcap_check),
            (f"SandwichRMSNorm {name}", norm_check),
            (f"SlidingWindowAttention prefill {name}", attention_check),
            (f"SlidingWindowAttention decode {name}", lambda dt=dt, name=name: attention_check(dt, name, True)),
            (f"SlidingWindowAttentionInplace long prompt {name}", inplace_check),
            (
                f"SlidingWindowAttentionInplace decode, rows apart {name}",
                lambda dt=dt, name=name: inplace_check(dt, name, "decode"),
            ),
        ]
        for check, fn in checks:
            run_check(rows, "kernels vs references", check, fn)


# --- 3. the PyTorch model on the GPU ----------------------------------------------------------------------


def model_checks(rows: list[Row], dev: str) -> None:
    from export.config import preset
    from export.weights import RandomWeights, load_model

    cfg = preset("tiny").replace(tie_word_embeddings=False)

    def contracts() -> tuple[bool, str]:
        model = load_model(RandomWeights(cfg, seed=1)).to(dev)
        lengths, steps = (25, 22, 5), 48
        width = max(lengths)
        ids = torch.randint(0, cfg.vocab_size, (3, width), generator=torch.Generator().manual_seed(0)).to(dev)
        pos = torch.stack([torch.arange(width) - (width - n) for n in lengths]).to(dev)
        mask = (pos >= 0).long()
        dyn_pos = pos.clamp(min=0)
        cache = model.empty_cache(3, width + steps, cfg.sliding_window, device=dev)
        tokens = {"dynamic": [], "inplace": []}
        with torch.no_grad():
            a, past = model(ids, mask, dyn_pos, model.empty_past(3, device=dev))
            b, _ = model.forward_inplace(ids, pos, cache)
            worst = float((a - b)[mask.bool()].abs().max())
            na = nb = None
            for _ in range(steps):
                na, nb = a[:, -1].argmax(-1, keepdim=True), b[:, -1].argmax(-1, keepdim=True)
                tokens["dynamic"].append(na), tokens["inplace"].append(nb)
                mask = torch.cat([mask, torch.ones_like(na)], 1)
                dyn_pos, pos = dyn_pos[:, -1:] + 1, pos[:, -1:] + 1
                a, past = model(na, mask, dyn_pos, past)
                b, _ = model.forward_inplace(nb, pos, cache)
                worst = max(worst, float((a - b).abs().max()))
        same = torch.equal(torch.cat(tokens["dynamic"], 1), torch.cat(tokens["inplace"], 1))
        return (
            worst <= 1e-4 and same,
            f"max |Δlogit| {worst:.2e}, greedy tokens equal {same} ({steps} steps, ring wraps)",
        )

    run_check(rows, "PyTorch model", f"in-place = dynamic contract on {dev}", contracts)


# --- 4. kernel timings -------------------------------------------------------------------------------------


def kernel_timings(rows: list[Row], out: Path, timeout: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def run() -> tuple[bool, str]:
        if SMOKE:
            raise Skip("timings need a GPU (--smoke)")
        bench_out = out / "kernel_timings"
        cmd = [sys.executable, str(ROOT / "benchmarks/kernels/bench_kernels.py"), "--quick", "--out", str(bench_out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        files = sorted(bench_out.glob("*.json"))
        if done.returncode != 0 or not files:
            raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"])
        found.update(json.loads(files[0].read_text()))
        n = len(found.get("rows", []))
        return True, f"{n} rows ({files[0].name})"

    run_check(rows, "kernel timings", "bench_kernels.py --quick", run)
    return found


# --- 5, 6. runtimes on the GPU -----------------------------------------------------------------------------


def runtime_checks(rows: list[Row], work: Path) -> None:
    from deploy.generate.loop import GenerationConfig, generate
    from deploy.runners.torch_runner import TorchRunner
    from export.config import preset
    from export.onnx_export import ExportOptions, export_onnx
    from export.weights import RandomWeights, load_model

    cfg = preset("tiny").replace(tie_word_embeddings=False)
    source = RandomWeights(cfg, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (25, 22, 5)]
    config = GenerationConfig(max_new_tokens=32, stop_tokens=())
    state: dict[str, Any] = {}

    def reference() -> list[list[int]]:
        if "tokens" not in state:
            state["tokens"] = generate(TorchRunner(load_model(source)), prompts, config).tokens
        return state["tokens"]

    def export() -> Path:
        if "onnx" not in state:
            state["onnx"] = export_onnx(source, work / "onnx", ExportOptions(kv_cache="inplace")).model_path
        return state["onnx"]

    def ort_cuda() -> tuple[bool, str]:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no CUDA provider (pip install onnxruntime-gpu)")
        from deploy.runners.ort_runner import OrtInplaceRunner
        from graph_passes import optimize

        path = optimize(export(), "ort", work / "ort-cuda", provider="cuda").model_path
        runner = OrtInplaceRunner(
            path, cfg, full_sliding=True, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        got = generate(runner, prompts, config)
        same = got.tokens == reference()
        step = float(np.median(got.step_s)) * 1e3
        return same, f"greedy tokens equal {same}; decode step {step:.3f} ms (batch 3)"

    def tensorrt() -> tuple[bool, str]:
        from deploy.engine.backend import resolve_backend
        from deploy.engine.build import BuildOptions, build_engine
        from deploy.runners.trt_runner import TrtInplaceRunner, unavailable_reason
        from graph_passes import optimize

        reason = unavailable_reason()
        if reason:
            raise Skip(reason)
        backend = resolve_backend("auto")
        native = optimize(export(), "trt-native", work / "trt-native").model_path
        engine = work / "engine" / "model.engine"
        build_engine(native, engine, BuildOptions(backend=backend.name, max={"batch": 4, "seq": 64, "cache": 128}))
        results = []
        for capture in (False, True):
            runner = TrtInplaceRunner(engine, cfg, capture_decode=capture)
            got = generate(runner, prompts, config)
            results.append((got.tokens == reference(), float(np.median(got.step_s)) * 1e3))
        same = all(r[0] for r in results)
        return (
            same,
            f"greedy tokens equal {same}; decode step {results[0][1]:.3f} ms, CUDA graph {results[1][1]:.3f} ms",
        )

    run_check(rows, "runtimes", "onnxruntime CUDA provider, in-place ort target (--provider cuda)", ort_cuda)
    run_check(rows, "runtimes", "TensorRT, in-place trt-native engine, TrtInplaceRunner", tensorrt)


# --- the run ------------------------------------------------------------------------------------------------


def markdown(facts: dict[str, Any], rows: list[Row], command: str, seconds: float) -> str:
    lines = [f"# g2trt GPU check: {facts.get('device')}", "", f"`{command}` ({seconds:.0f} s)", ""]
    lines += [f"- {k}: `{v}`" for k, v in facts.items() if k != "device"]
    lines += ["", "| section | check | status | measured | note | s |", "|---|---|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r.section} | {r.check} | {r.status} | {r.value} | {r.note} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_check")
    ap.add_argument("--smoke", action="store_true", help="CPU run under TRITON_INTERPRET=1 to check the script")
    ap.add_argument("--timings-timeout", type=float, default=240, help="seconds for the kernel timings")
    args = ap.parse_args()
    if args.smoke != SMOKE:
        sys.exit("--smoke and TRITON_INTERPRET=1 go together (Triton chooses the interpreter at import)")
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (or --smoke with TRITON_INTERPRET=1 on a CPU)")
    start = time.perf_counter()
    dev = "cpu" if SMOKE else "cuda"
    facts = device_facts()
    rows: list[Row] = []
    args.out.mkdir(parents=True, exist_ok=True)
    kernel_checks(rows, dev, quick=SMOKE)
    model_checks(rows, dev)
    timings = kernel_timings(rows, args.out, args.timings_timeout)
    with tempfile.TemporaryDirectory(prefix="g2trt-gpu-check-") as tmp:
        runtime_checks(rows, Path(tmp))
    seconds = time.perf_counter() - start
    command = " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]])
    name = "smoke" if SMOKE else str(facts.get("device", "gpu")).replace(" ", "_")
    result = {"command": command, "seconds": seconds, "facts": facts, "rows": [dataclasses.asdict(r) for r in rows]}
    result["kernel_timings"] = timings
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(facts, rows, command, seconds))
    print(markdown(facts, rows, command, seconds))
    failed = [r for r in rows if r.status in ("FAIL", "error")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

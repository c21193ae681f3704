"""GPU timings of the plugin kernels against their PyTorch references and torch's own kernels.

For each Gemma 2 shaped case: the Triton kernel (`trt_plugins.kernels.*`), the plugin's PyTorch reference
run eagerly, optionally that reference under `torch.compile` (a fusing compiler: the proxy for what a graph
compiler fuses by itself), and for attention `torch.nn.functional.scaled_dot_product_attention` (+ the
torch.cat that builds the presents). SDPA has no soft-cap, so it is a speed baseline, not the same math.
Each case first checks the kernel against the reference on the GPU (max abs diff is recorded).

Timing: median of `triton.testing.do_bench_cudagraph` (a CUDA graph replay, as a TensorRT engine launches
kernels: no Python or launcher overhead, but inputs that fit in L2 stay there), or with `--timer events`
`triton.testing.do_bench` (one launch per rep, L2 flushed before each, CPU launch overhead included). The
Triton variant launches a prepared `KernelPlan` (what the plugin does), not `launch()` with its checks.
Only the Triton variants are ever captured in a CUDA graph: the references, torch.compile and SDPA
allocate and may synchronize with the host (the reference mask's pageable `.to(device)`), which a
capture refuses, so they are always timed with events; each row records its timer. A variant that fails
(out of memory, a refused capture) is a row with a note, not the end of the run.
Bandwidth is the minimum bytes the op must move (inputs read once, outputs written once) over the median.

    python benchmarks/kernels/bench_kernels.py [--quick] [--compile] [--sweep] [--out benchmarks/kernels/results]
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_kernels.py --smoke   # CPU: checks the script, no timings

Writes OUT/<device>.json and OUT/<device>.md (device name, command, versions, medians, GB/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from export.model import attention_bias  # noqa: E402
from trt_plugins import attention, sandwich_rmsnorm, softcap  # noqa: E402
from trt_plugins.kernels import attention as k_attention  # noqa: E402
from trt_plugins.kernels import sandwich_rmsnorm as k_norm  # noqa: E402
from trt_plugins.kernels import softcap as k_softcap  # noqa: E402
from trt_plugins.kernels.common import DTYPE_NAMES  # noqa: E402

ES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.int64: 8}
SMOKE = os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass
class Row:
    op: str
    case: str
    variant: str
    median_ms: float | None
    gb_s: float | None
    tflop_s: float | None = None
    max_abs_diff: float | None = None
    note: str = ""
    timer: str = ""  # "cudagraph" or "events": how this variant is (or on a GPU would be) timed


def graph_safe(variant: str) -> bool:
    """Whether a variant may be captured in a CUDA graph: only the Triton plan launches (no allocation, no
    host synchronization); everything else is timed with events."""
    return variant.startswith("triton")


def timer_for(variant: str) -> str:
    return "cudagraph" if ARGS.timer == "cudagraph" and graph_safe(variant) else "events"


def timer(fn: Callable[[], object], warmup: int, reps: int, kind: str) -> float:
    """Median milliseconds of `fn`: `kind` "cudagraph" replays it from a CUDA graph (no CPU launch overhead;
    L2 stays warm), "events" launches it one by one with L2 flushed before each (CPU overhead included)."""
    if SMOKE:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    if kind == "cudagraph":
        return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median"))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * ES[t.dtype] for t in tensors)


def maybe_compile(fn: Callable, enabled: bool) -> Callable | None:
    return torch.compile(fn, dynamic=False) if enabled and not SMOKE else None


def bench(
    rows: list[Row],
    op: str,
    case: str,
    variants: dict[str, Callable | None],
    call: tuple[tuple, dict],
    moved: int,
    flops: int | None = None,
) -> Row:
    """Time every variant on the same `call` (args, kwargs); returns the first variant's row."""
    start = len(rows)
    for name, fn in variants.items():
        if fn is None:
            continue
        kind = timer_for(name)
        try:
            ms = timer(functools.partial(fn, *call[0], **call[1]), ARGS.warmup, ARGS.reps, kind)
        except torch.OutOfMemoryError:
            rows.append(Row(op, case, name, None, None, note="out of memory", timer=kind))
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # e.g. a capture the variant does not allow: a result, not the end of the run
            rows.append(Row(op, case, name, None, None, note=f"{type(e).__name__}: {str(e)[:80]}", timer=kind))
            continue
        rows.append(Row(op, case, name, ms, moved / ms / 1e6, flops / ms / 1e9 if flops else None, timer=kind))
    return rows[start]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def softcap_cases(rows: list[Row], dev: str) -> None:
    vocab = 1000 if SMOKE else 256000
    for n in [1, 8] if SMOKE or ARGS.quick else [1, 8, 512, 2048]:
        x = torch.randn(n, vocab, device=dev) * 40
        ref = softcap.reference(x, cap=30.0)
        got = k_softcap.launch(x, cap=30.0)
        case = f"fp32 [{n}, {vocab}] cap 30"
        moved = nbytes(x, ref)
        plan = k_softcap.plan("fp32", cap=30.0, n_cols=vocab)
        variants = {
            "triton": lambda x, cap, plan=plan, y=torch.empty_like(x): plan.run([x], [y]),
            "reference (eager)": softcap.reference,
            "reference (torch.compile)": maybe_compile(softcap.reference, ARGS.compile),
        }
        bench(rows, "SoftCap", case, variants, ((x,), {"cap": 30.0}), moved).max_abs_diff = diff(got, ref)


def norm_cases(rows: list[Row], dev: str) -> None:
    dtypes = [  # (x, residual, scales) as Gemma 2 exports give them
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
    ]
    hiddens = [64] if SMOKE else [2304, 3584, 4608]
    counts = [1, 8] if SMOKE or ARGS.quick else [1, 8, 512, 4096]
    for xd, rd, sd in dtypes:
        for hidden in hiddens:
            for n in counts:
                x = torch.randn(n, hidden, device=dev).to(xd)
                res = (torch.randn(n, hidden, device=dev) * 100).to(rd)
                post, pre = ((1 + 0.1 * torch.randn(hidden, device=dev)).to(sd) for _ in range(2))
                ref = sandwich_rmsnorm.reference(x, res, post, pre, epsilon=1e-6)
                got = k_norm.launch(x, res, post, pre, epsilon=1e-6)
                case = f"{str(xd)[6:]} x, {str(rd)[6:]} residual [{n}, {hidden}]"
                moved = nbytes(x, res, post, pre, *ref)
                names = {"x": xd, "residual": rd, "post_scale": sd, "pre_scale": sd}
                dts = {k: DTYPE_NAMES[v] for k, v in names.items()}
                plan = k_norm.plan(dts["x"], epsilon=1e-6, hidden=hidden, tensor_dtypes=dts)
                outs = [torch.empty_like(t) for t in got]

                def run_plan(*inputs: torch.Tensor, epsilon: float, plan=plan, outs=outs) -> None:
                    plan.run(list(inputs), outs)

                variants = {
                    "triton": run_plan,
                    "reference (eager)": sandwich_rmsnorm.reference,
                    "reference (torch.compile)": maybe_compile(sandwich_rmsnorm.reference, ARGS.compile),
                }
                first = bench(rows, "SandwichRMSNorm", case, variants, ((x, res, post, pre), {"epsilon": 1e-6}), moved)
                first.max_abs_diff = max(diff(got[0], ref[0]), diff(got[1], ref[1]))


def sdpa_baseline(q: torch.Tensor, mask: torch.Tensor, past: int, window: int) -> Callable:
    """torch's attention for the same shapes: cat for the presents, SDPA with the same boolean mask (GQA by
    `enable_gqa`), no soft-cap. Flash kernels need no mask: the causal global prefill uses `is_causal`. The
    mask and the causal choice are made here, before timing: the timed call never waits on the host."""
    s, t = q.shape[2], past + q.shape[2]
    causal = window == 0 and s == t and bool(mask.all())
    allowed = None if causal else attention_bias(mask, s, t, window) == 0

    def run(q, k, v, pk, pv, mask, *, num_heads, kv_heads, head_dim, scale, softcap=0.0, window=0):
        present_k, present_v = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, present_k, present_v, attn_mask=allowed, is_causal=causal, scale=scale, enable_gqa=True
        )
        return out, present_k, present_v

    return run


def attention_flops(b: int, h: int, hd: int, s: int, p: int, window: int) -> int:
    pairs = sum(min(p + i + 1, window) if window else p + i + 1 for i in range(s))
    return 4 * b * h * hd * pairs


ATTN_MODELS = {  # name: (num_heads, kv_heads, head_dim, scale)
    "2b": (8, 4, 256, 256**-0.5),
    "27b": (32, 16, 128, 144**-0.5),
}


def attention_cases(rows: list[Row], dev: str) -> None:
    dt = torch.float32 if SMOKE else torch.float16
    if SMOKE:
        shapes = [("2b", 1, 16, 0, 8), ("2b", 1, 1, 15, 8)]
        models = {"2b": (4, 2, 32, 32**-0.5)}
    else:
        models = ATTN_MODELS
        shapes = [  # (model, batch, S, P, window)
            ("2b", 1, 2048, 0, 0),
            ("2b", 1, 8192, 0, 4096),
            ("2b", 1, 1, 4095, 4096),  # sliding decode with a trimmed cache
            ("2b", 8, 1, 8191, 0),  # global decode
            ("27b", 1, 2048, 0, 4096),
            ("27b", 8, 1, 4095, 4096),
        ]
        if not ARGS.quick:
            shapes += [("2b", 1, 512, 0, 0), ("2b", 1, 8192, 0, 0), ("2b", 1, 1, 8191, 4096), ("2b", 8, 1, 4095, 4096)]
    for name, b, s, p, window in shapes:
        h, kv, hd, scale = models[name]
        q = torch.randn(b, h, s, hd, device=dev).to(dt)
        k, v = (torch.randn(b, kv, s, hd, device=dev).to(dt) for _ in range(2))
        pk, pv = (torch.randn(b, kv, p, hd, device=dev).to(dt) for _ in range(2))
        mask = torch.ones(b, p + s, dtype=torch.int64, device=dev)
        attrs = {"num_heads": h, "kv_heads": kv, "head_dim": hd, "scale": scale, "softcap": 50.0, "window": window}
        case = f"{name} {str(dt)[6:]} B={b} S={s} P={p} window={window}"
        got = k_attention.launch(q, k, v, pk, pv, mask, **attrs)
        ref_bytes = b * h * s * (p + s) * 4 * 3  # materialized scores, softmax, bias
        note = ""
        if ref_bytes < 8 * 2**30:
            ref = attention.reference(q, k, v, pk, pv, mask, **attrs)
            err = max(diff(got[0], ref[0]), diff(got[1], ref[1]), diff(got[2], ref[2]))
            del ref
        else:
            err, note = None, "reference skipped: its score matrix would exceed 8 GiB"
        moved = nbytes(q, k, v, pk, pv, mask, *got)
        flops = attention_flops(b, h, hd, s, p, window)
        tensor_dtypes = {n: "fp32" if SMOKE else "fp16" for n in attention.SPEC.inputs if n != "attention_mask"}
        plan = k_attention.plan("fp32" if SMOKE else "fp16", **attrs, tensor_dtypes=tensor_dtypes)
        outs = [torch.empty_like(t) for t in got]

        def run_plan(*inputs: torch.Tensor, plan=plan, outs=outs, **_: object) -> None:
            plan.run(list(inputs), outs)

        variants = {
            "triton (fused append)": run_plan,
            "reference (eager)": attention.reference if not note else None,
            "torch SDPA + cat (no softcap)": sdpa_baseline(q, mask, p, window),
        }
        first = bench(rows, "SlidingWindowAttention", case, variants, ((q, k, v, pk, pv, mask), attrs), moved, flops)
        first.max_abs_diff, first.note = err, note
        if ARGS.sweep:
            sweep(rows, case, (q, k, v, pk, pv, mask), attrs, got, moved, flops)


def sweep(rows: list[Row], case: str, inputs, attrs, outputs, moved: int, flops: int) -> None:
    """Block configurations around the default, for tuning `default_blocks` on this GPU."""
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[inputs[0].dtype]
    tensor_dtypes = {n: dtype for n in attention.SPEC.inputs if n != "attention_mask"}
    kind = timer_for("triton")
    for bm, bn, warps, stages in [(64, 16, 4, 1), (64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2),
                                  (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)]:  # fmt: skip
        name = f"triton sweep {bm}x{bn} w{warps} s{stages}"
        try:
            plan = k_attention.plan(dtype, **attrs, tensor_dtypes=tensor_dtypes, block_m=bm, block_n=bn,
                                    num_warps=warps, num_stages=stages)  # fmt: skip
            ms = timer(functools.partial(plan.run, list(inputs), list(outputs)), ARGS.warmup, ARGS.reps, kind)
            rows.append(Row("SlidingWindowAttention", case, name, ms, moved / ms / 1e6, flops / ms / 1e9,
                            timer=kind))  # fmt: skip
        except Exception as e:  # a config that does not fit this GPU (shared memory) is a result, not a crash
            rows.append(Row("SlidingWindowAttention", case, name, None, None,
                            note=f"{type(e).__name__}: {str(e)[:80]}", timer=kind))  # fmt: skip


def device_facts() -> dict:
    import triton

    facts = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "timer": "perf_counter (smoke)" if SMOKE else ARGS.timer,
    }
    if SMOKE:
        return {**facts, "device": "CPU (TRITON_INTERPRET=1 smoke run: timings are meaningless)"}
    props = torch.cuda.get_device_properties(0)
    return {
        **facts,
        "device": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "cuda": torch.version.cuda,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def markdown(facts: dict, rows: list[Row]) -> str:
    head = [f"# Plugin kernel timings: {facts['device']}", ""]
    head += [f"- {k}: `{v}`" for k, v in facts.items() if k != "device"]
    head += ["", "| op | case | variant | timer | median ms | GB/s | TFLOP/s | max abs diff vs reference | note |"]
    head += ["|---|---|---|---|---:|---:|---:|---:|---|"]

    def f(x: float | None, p: int) -> str:
        return "" if x is None else f"{x:.{p}f}"

    for r in rows:
        head.append(
            f"| {r.op} | {r.case} | {r.variant} | {r.timer} | {f(r.median_ms, 4)} | {f(r.gb_s, 1)} | "
            f"{f(r.tflop_s, 1)} | {'' if r.max_abs_diff is None else f'{r.max_abs_diff:.2e}'} | {r.note} |"
        )
    return "\n".join(head) + "\n"


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels" / "results")
    ap.add_argument("--ops", default="softcap,norm,attention", help="comma separated subset")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--compile", action="store_true", help="also time the references under torch.compile")
    ap.add_argument("--sweep", action="store_true", help="also time attention block configurations")
    ap.add_argument("--timer", choices=["cudagraph", "events"], default="cudagraph")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    ap.add_argument("--reps", type=int, default=100, help="do_bench measuring time, ms")
    ap.add_argument("--smoke", action="store_true", help="CPU run under TRITON_INTERPRET=1 to check the script")
    ARGS = ap.parse_args()
    if ARGS.smoke != SMOKE:
        sys.exit("--smoke and TRITON_INTERPRET=1 go together (the interpreter is chosen at import)")
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (or --smoke with TRITON_INTERPRET=1)")
    dev = "cpu" if SMOKE else "cuda"
    torch.manual_seed(0)
    rows: list[Row] = []
    ops = set(ARGS.ops.split(","))
    for name, fn in (("softcap", softcap_cases), ("norm", norm_cases), ("attention", attention_cases)):
        if name in ops:
            fn(rows, dev)
    facts = device_facts()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", facts["device"]).strip("-").lower()[:60]
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / f"{slug}.json").write_text(
        json.dumps({**facts, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n"
    )
    text = markdown(facts, rows)
    (ARGS.out / f"{slug}.md").write_text(text)
    print(text)
    print(f"wrote {ARGS.out / slug}.json and .md")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()

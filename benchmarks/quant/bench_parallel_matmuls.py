"""Should `fuse_parallel_matmuls` concatenate quantized weights? q/k/v and gate/up as separate
DequantizeLinear -> MatMul (each fused by onnxruntime into its own MatMulNBits) vs one MatMulNBits on the
concatenated codes and scales, followed by a Split.

    python benchmarks/quant/bench_parallel_matmuls.py

For int4 the concatenated weight cannot be written in the graph (ONNX's Concat takes no int4), so the
"one" variant here is the best case: weights concatenated ahead of time, as the pass would have to
write them into the weights file. For int8 a graph Concat of the initializers works (onnxruntime folds
it and fuses one MatMulNBits) and is what the pass would emit. Shapes: the medium model (hidden 512,
8/4 heads of 64, intermediate 2048) and Gemma 2 2B (hidden 2304, 8/4 heads of 256, intermediate 9216);
one row (decode) and 256 rows (prefill); `--threads` intra-op threads; variants interleaved, an idle
pause before each, medians. Writes parallel_matmuls.{json,md} beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from export.quantize import QuantSpec, quantize  # noqa: E402

GROUPS = {  # name -> (K, output widths)
    "medium q/k/v": (512, (512, 256, 256)),
    "medium gate/up": (512, (2048, 2048)),
    "2b q/k/v": (2304, (2048, 1024, 1024)),
    "2b gate/up": (2304, (9216, 9216)),
}


def _codes(name: str, codes: np.ndarray, scheme: str) -> onnx.TensorProto:
    if scheme == "int8":
        return numpy_helper.from_array(codes.astype(np.int8), name)
    flat = (codes.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)  # int4, two per byte, low nibble first
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=codes.shape)
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return t


def model(k: int, widths: tuple[int, ...], scheme: str, variant: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    spec = QuantSpec(scheme)  # type: ignore[arg-type]
    weights = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for n in widths]
    quantized = [quantize(w, spec, np.float32) for w in weights]
    outs = [f"y{i}" for i in range(len(widths))]
    nodes, inits = [], []
    dq = {"axis": 0, "block_size": spec.block_size}
    if variant == "separate":
        for i, (codes, scale) in enumerate(quantized):
            inits += [_codes(f"w{i}", codes, scheme), numpy_helper.from_array(scale, f"s{i}")]
            nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"d{i}"], **dq)]
            nodes += [helper.make_node("MatMul", ["x", f"d{i}"], [outs[i]])]
    else:
        scale = np.concatenate([s for _, s in quantized], axis=1)
        inits += [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.array(widths, np.int64), "widths")]
        if variant == "graph concat":  # what the pass would write (int8 only)
            for i, (codes, _) in enumerate(quantized):
                inits.append(_codes(f"w{i}", codes, scheme))
            nodes.append(helper.make_node("Concat", [f"w{i}" for i in range(len(widths))], ["w"], axis=1))
        else:  # "concatenated weights": written concatenated ahead of time
            inits.append(_codes("w", np.concatenate([c for c, _ in quantized], axis=1), scheme))
        nodes += [helper.make_node("DequantizeLinear", ["w", "s"], ["d"], **dq)]
        nodes += [helper.make_node("MatMul", ["x", "d"], ["y"])]
        nodes += [helper.make_node("Split", ["y", "widths"], outs, axis=-1)]
    graph = helper.make_graph(
        nodes,
        "group",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def session(data: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def fused_ops(data: bytes, threads: int) -> list[str]:
    """The op types onnxruntime runs (its optimized graph)."""
    with tempfile.TemporaryDirectory() as work:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        so.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for group, (k, widths) in GROUPS.items():
        for scheme in ("int4", "int8"):
            variants = ["separate", "concatenated weights"] + (["graph concat"] if scheme == "int8" else [])
            data = {v: model(k, widths, scheme, v, args.seed) for v in variants}
            sessions = {v: session(d, args.threads) for v, d in data.items()}
            ops = {v: fused_ops(d, args.threads) for v, d in data.items()}
            for n_rows in (1, 256):
                x = np.random.default_rng(1).standard_normal((1, n_rows, k)).astype(np.float32)
                times: dict[str, list[float]] = {v: [] for v in variants}
                reps = args.reps if n_rows == 1 else max(3, args.reps // 10)
                for r in range(args.rounds):
                    order = variants[r % len(variants) :] + variants[: r % len(variants)]
                    for v in order:
                        time.sleep(args.cooldown)
                        for _ in range(3):
                            sessions[v].run(None, {"x": x})
                        start = time.perf_counter()
                        for _ in range(reps):
                            sessions[v].run(None, {"x": x})
                        times[v].append((time.perf_counter() - start) / reps)
                base = statistics.median(times["separate"])
                for v in variants:
                    med = statistics.median(times[v])
                    rows.append(
                        {
                            "group": group,
                            "scheme": scheme,
                            "rows": n_rows,
                            "variant": v,
                            "us": 1e6 * med,
                            "vs_separate": med / base,
                            "ops": ops[v],
                        }
                    )
                    print(rows[-1], flush=True)
    return {
        "command": " ".join(["python benchmarks/quant/bench_parallel_matmuls.py", *sys.argv[1:]]),
        "machine": {**_machine(), "load_avg_at_end": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("threads", "rounds", "reps", "cooldown", "seed")},
        "rows": rows,
    }


def _machine() -> dict[str, Any]:
    from deploy.bench.report import machine_info

    return machine_info()


def markdown(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        "# q/k/v and gate/up on quantized weights: separate MatMulNBits vs one on concatenated weights",
        "",
        f"`{res['command']}`",
        "",
        f"onnxruntime {m['versions'].get('onnxruntime')} CPU, {s['threads']} threads, {m['cpu']} ({m['cores']} cores), "
        f"{s['rounds']} interleaved rounds, medians; load average at end "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_end'])}. RTN, block 32, fp32 scales. "
        "What onnxruntime runs: separate -> one MatMulNBits per projection; concatenated -> one MatMulNBits + Split.",
        "",
        "| group | weights | rows | separate µs | concatenated weights | graph Concat (int8) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keyed = {(r["group"], r["scheme"], r["rows"], r["variant"]): r for r in res["rows"]}
    for group in GROUPS:
        for scheme in ("int4", "int8"):
            for n_rows in (1, 256):
                sep = keyed[group, scheme, n_rows, "separate"]
                cat = keyed[group, scheme, n_rows, "concatenated weights"]
                graph = keyed.get((group, scheme, n_rows, "graph concat"))
                g = f"{graph['vs_separate']:.2f}x" if graph else "not expressible"
                lines.append(f"| {group} | {scheme} | {n_rows} | {sep['us']:.0f} | {cat['vs_separate']:.2f}x | {g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=50, help="runs per timed trial at one row (prefill: a tenth)")
    ap.add_argument("--cooldown", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel_matmuls.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "parallel_matmuls.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

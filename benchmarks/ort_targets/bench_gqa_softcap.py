"""onnxruntime CPU GroupQueryAttention, one layer: what `softcap` costs over a prompt and for one token.

    python benchmarks/ort_targets/bench_gqa_softcap.py

Why lower_attention_ort runs prompts through the standard-op core and only one-token steps through
GroupQueryAttention. One GQA node with the benchmark model's attention shape (8 heads / 4 KV heads,
head_dim 64), local window 4096 as Gemma's sliding layers, fp32, 2 threads; a 256-token prompt with
an empty cache, and one token over a 256-entry cache; softcap 0 (off) and 50 (Gemma 2); medians of
200 runs. Writes gqa_softcap.md beside this script.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from deploy.bench.report import machine_info  # noqa: E402

H, KV, D, WINDOW, THREADS, RUNS = 8, 4, 64, 4096, 2, 200


def gqa_model(softcap: float, window: int = WINDOW) -> bytes:
    """One GroupQueryAttention node on separate q/k/v [1, s, ·] and a past of p positions."""
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("q", f32, [1, "s", H * D]),
        helper.make_tensor_value_info("k", f32, [1, "s", KV * D]),
        helper.make_tensor_value_info("v", f32, [1, "s", KV * D]),
        helper.make_tensor_value_info("past_k", f32, [1, KV, "p", D]),
        helper.make_tensor_value_info("past_v", f32, [1, KV, "p", D]),
        helper.make_tensor_value_info("seqlens_k", i32, [1]),
        helper.make_tensor_value_info("total", i32, []),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=KV,
        scale=D**-0.5,
        softcap=softcap,
        local_window_size=window,
    )
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in node.output]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    ops = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=ops).SerializeToString()


def feeds(seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"q": (1, seq, H * D), "k": (1, seq, KV * D), "v": (1, seq, KV * D)}
    f = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    f |= {n: rng.standard_normal((1, KV, past, D)).astype(np.float32) for n in ("past_k", "past_v")}
    return f | {"seqlens_k": np.array([past + seq - 1], np.int32), "total": np.array(past + seq, np.int32)}


def median_ms(session: ort.InferenceSession, f: dict[str, np.ndarray]) -> float:
    for _ in range(10):
        session.run(None, f)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, f)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    rows = []
    for label, seq, past in (("prompt 256, empty cache", 256, 0), ("1 token, cache 256", 1, 256)):
        times = {}
        for cap in (0.0, 50.0):
            session = ort.InferenceSession(gqa_model(cap), so, providers=["CPUExecutionProvider"])
            times[cap] = median_ms(session, feeds(seq, past))
        rows.append(f"| {label} | {times[0.0]:.3f} | {times[50.0]:.3f} | {times[50.0] / times[0.0]:.2f} |")
    m = machine_info()
    text = "\n".join(
        [
            "# onnxruntime CPU GroupQueryAttention: the cost of softcap, one layer",
            "",
            "`python benchmarks/ort_targets/bench_gqa_softcap.py`",
            "",
            f"{H} heads / {KV} KV heads, head_dim {D}, local_window_size {WINDOW}, fp32, batch 1, "
            f"{THREADS} threads, medians of {RUNS} runs.",
            f"Machine: {m['cpu']} ({m['cores']} cores), onnxruntime {m['versions'].get('onnxruntime')}.",
            "",
            "| step | softcap 0: ms | softcap 50: ms | ratio |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )
    (HERE / "gqa_softcap.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

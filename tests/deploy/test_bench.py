"""`g2trt bench` end to end on small settings: every backend in one interleaved run, results written,
what cannot run here listed with its reason. (No timing is asserted: speed claims live in benchmarks/.)"""

from __future__ import annotations

import json

import pytest

from deploy.bench.run import BenchError, BenchSettings, run
from deploy.runners.trt_runner import cuda_available


@pytest.fixture(scope="module")
def bench(tmp_path_factory, runtime_cfg):
    settings = BenchSettings(batches=(2,), prompts=(20,), new_tokens=6, warmup=1, repeats=2, threads=1)
    out = tmp_path_factory.mktemp("bench")
    result, paths = run(None, settings, out, config=runtime_cfg, seed=1)
    return result, paths


def test_every_runnable_backend_ran_and_agrees_with_torch(bench):
    result, _ = bench
    status = {b.backend: b for b in result.backends}
    assert [b.backend for b in result.backends] == ["torch", "ort-plain", "ort", "trt", "ort-genai"]
    for name in ("torch", "ort-plain", "ort", "ort-genai"):
        assert status[name].status == "ok", status[name]
        assert status[name].peak_rss_mib > status[name].base_rss_mib > 0
    if not cuda_available():
        assert status["trt"].status == "skipped" and "no CUDA GPU" in status["trt"].reason
    rows = {r.backend: r for r in result.rows}
    assert set(rows) == {b.backend for b in result.backends if b.status == "ok"}
    for name, row in rows.items():
        assert row.ttft_ms_p50 > 0 and row.decode_tok_s_p50 > 0 and row.step_ms_p90 >= row.step_ms_p50
        if name != "torch":  # greedy tokens, same prompt: the peer builder's model included
            assert (row.agree_with, row.agree) == ("torch", 1.0), name
    assert rows["ort-plain"].ttft_speedup == rows["ort-plain"].decode_speedup == 1.0
    assert rows["ort-genai"].kv_mib is None and rows["ort-plain"].kv_mib > 0
    # the ort target's sliding layers take full buffers (graph_passes/targets.py: GQA decodes every layer),
    # the plain export's rings of the window: more cache once a sequence outgrows the window
    assert rows["ort"].kv_mib > rows["ort-plain"].kv_mib


def test_results_written(bench):
    _, paths = bench
    raw = json.loads(paths["json"].read_text())
    assert raw["format"] == "g2trt-bench/1" and raw["settings"]["new_tokens"] == 6
    assert {b["backend"]: b["status"] for b in raw["backends"]}["ort-plain"] == "ok"
    assert "VmHWM" in raw["method"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert "| ort-genai |" in md and "speedups (x) against ort-plain" in md
    assert not (paths["json"].parent / "work").exists()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"backends": ("torch", "tvm")}, "unknown backend 'tvm'"),
        ({"batches": (0,)}, "--batch values must be >= 1"),
        ({"new_tokens": 1}, "--new must be >= 2"),
        ({"repeats": 0}, "--repeats must be >= 1"),
    ],
)
def test_bad_settings(kw, message):
    with pytest.raises(BenchError, match=message):
        BenchSettings(**kw)


def test_baseline_must_be_benchmarked(tmp_path):
    with pytest.raises(BenchError, match="baseline 'ort-plain' is not among the backends"):
        run(None, BenchSettings(backends=("torch",), prompts=(8,), new_tokens=2), tmp_path)

"""A real Triton Inference Server (nvidia-pytriton's tritonserver) on loopback, free ports, real clients.

One server per module (the untied tiny model's in-place export, 4 slots batched in flight, a word-level
tokenizer) answers: HTTP generate,
HTTP generate_stream and gRPC streaming with `g2trt generate`'s greedy tokens; text in and out; 32
concurrent clients x 4 requests; malformed requests (each an error naming the problem, the server
serving on); clients that disconnect mid-stream. Separate servers show the stops: a model that cannot
load fails `g2trt serve` fast with one line, a server that never gets ready is stopped at the timeout,
and SIGTERM leaves no process and no shared memory behind. Skipped where the serve extra is missing.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deploy.generate.loop import GenerationConfig, generate
from deploy.generate.tokenizer import write_id_tokenizer
from deploy.runners.ort_runner import OrtRunner
from deploy.serve import client
from deploy.serve.generate_model import package_repository
from deploy.serve.runtime import ServingParams
from deploy.serve.server import (
    ServeError,
    ServerOptions,
    TritonServer,
    group_alive,
    leftover_regions,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

MODEL = "gemma2_generate"
SLOTS = 4
FREE = ServerOptions(http_port=0, grpc_port=0, metrics_port=0, ready_timeout=90)


@pytest.fixture(scope="module")
def repo(runtime_inplace_export, runtime_cfg, tmp_path_factory) -> Path:
    """The in-place export: the server batches requests in flight (the dynamic contract's model runs its
    slots one by one; tests/deploy/test_serve_scheduler.py covers both)."""
    return _package(runtime_inplace_export, runtime_cfg, tmp_path_factory)


def _package(export, cfg, tmp_path_factory, **params) -> Path:
    src = tmp_path_factory.mktemp("serve-src")
    for f in export.model_path.parent.iterdir():
        (src / f.name).symlink_to(f)
    write_id_tokenizer(cfg, src)
    out = tmp_path_factory.mktemp("serve-repo")
    package_repository(src, out, params=ServingParams(slots=SLOTS, threads=1, **params))
    return out


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo, FREE) as s:
        yield s
    assert not group_alive(s.proc.pid) and not leftover_regions(s.shm_prefix)


@pytest.fixture(scope="module")
def runner(runtime_export, runtime_cfg) -> OrtRunner:
    return OrtRunner(runtime_export.model_path, runtime_cfg, threads=1)


@pytest.fixture(scope="module")
def reference(runner):
    """Greedy tokens `generate` gives (no early stop), cached per prompt: any shorter run is a prefix."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt: list[int], n: int) -> list[int]:
        key = tuple(prompt)
        if len(cache.get(key, [])) < n:
            cache[key] = generate(runner, [prompt], GenerationConfig(max_new_tokens=max(n, 32), stop_tokens=())).tokens[
                0
            ]
        return cache[key][:n]

    return tokens


def prompt_of(n: int, seed: int, vocab: int) -> list[int]:
    return [2, *np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()]


def gauges(server: TritonServer) -> dict[str, float]:
    return {k: v[MODEL] for k, v in client.metrics(server.metrics_url).items()}


def settle(server: TritonServer, timeout: float = 10) -> dict[str, float]:
    """Gauges once no slot is busy and nothing waits (the slots every request held are back)."""
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(server)
        if (g["g2trt_slots_busy"], g["g2trt_queue_size"]) == (0, 0) or time.monotonic() > deadline:
            return g
        time.sleep(0.05)


# gRPC streaming through tritonclient


def grpc_inputs(**values: np.ndarray):
    import tritonclient.grpc as grpcclient

    types = {
        np.dtype(np.int64): "INT64",
        np.dtype(np.int32): "INT32",
        np.dtype(np.float32): "FP32",
        np.dtype(bool): "BOOL",
    }
    inputs = []
    for name, value in values.items():
        value = np.asarray(value)
        dtype = "BYTES" if value.dtype == object else types[value.dtype]
        x = grpcclient.InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        inputs.append(x)
    return inputs


def grpc_stream(server: TritonServer, cancel_after: int | None = None, **values) -> tuple[list[int], str]:
    """Stream one request over gRPC; (token ids, joined text). `cancel_after` tokens: cancel the stream."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    ids: list[int] = []
    text = ""
    try:
        c.async_stream_infer(MODEL, grpc_inputs(**values), enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                raise client.RequestFailed(error.message())
            response = result.get_response()
            if response.outputs:
                ids.extend(result.as_numpy("output_ids").tolist())
                if result.as_numpy("text_output") is not None:
                    text += result.as_numpy("text_output")[0].decode()
            if cancel_after is not None and len(ids) >= cancel_after:
                c.stop_stream(cancel_requests=True)
                return ids, text
            if response.parameters["triton_final_response"].bool_param:
                return ids, text
    finally:
        c.stop_stream()
        c.close()


# Token identity with g2trt generate


@pytest.mark.parametrize("n", [1, 7, 40])
def test_http_generate_stream_and_grpc_give_generates_tokens(server, reference, runtime_cfg, n):
    prompt = prompt_of(n, seed=n, vocab=runtime_cfg.vocab_size)
    want = reference(prompt, 24)
    assert len(set(want)) >= 6, want  # varied tokens: a broken cache would show
    body = {"input_ids": prompt, "max_tokens": 24, "end_id": -1}
    assert client.generate(server.url, MODEL, body)["output_ids"] == want
    assert client.stream_ids(server.url, MODEL, body)[0] == want
    assert (
        grpc_stream(
            server,
            input_ids=np.array(prompt),
            max_tokens=np.array([24], np.int32),
            end_id=np.array([-1], np.int32),
            stream=np.array([True]),
        )[0]
        == want
    )


def test_tokens_equal_the_g2trt_generate_command(server, runtime_export, runtime_cfg):
    prompt = prompt_of(9, seed=99, vocab=runtime_cfg.vocab_size)
    done = subprocess.run(
        [
            shutil.which("g2trt") or "g2trt",
            "generate",
            str(runtime_export.model_path),
            "--backend",
            "ort",
            "--ids",
            " ".join(map(str, prompt)),
            "--max-new-tokens",
            "16",
            "--no-stop",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want = json.loads(done.stdout)["outputs"][0]["new_ids"]
    assert client.stream_ids(server.url, MODEL, {"input_ids": prompt, "max_tokens": 16, "end_id": -1})[0] == want


def test_text_in_text_out(server, reference, runtime_cfg):
    words = prompt_of(6, seed=5, vocab=runtime_cfg.vocab_size)[1:]
    text = " ".join(f"t{t}" for t in words)
    want = reference([runtime_cfg.bos_token_id, *words], 12)  # the tokenizer prepends <bos>
    want_text = " ".join(f"t{t}" for t in want)
    one = client.generate(server.url, MODEL, {"text_input": text, "max_tokens": 12, "end_id": -1})
    assert one["output_ids"] == want and one["text_output"] == want_text
    assert client.stream_ids(server.url, MODEL, {"text_input": text, "max_tokens": 12, "end_id": -1}) == (
        want,
        want_text,
    )
    got = grpc_stream(
        server,
        text_input=np.array([text.encode()], dtype=object),
        max_tokens=np.array([12], np.int32),
        end_id=np.array([-1], np.int32),
        stream=np.array([True]),
    )
    assert got == (want, want_text)


def test_stop_token_ends_the_stream(server, reference, runtime_cfg):
    prompt = prompt_of(7, seed=7, vocab=runtime_cfg.vocab_size)
    want = reference(prompt, 24)
    stop = want[5]
    got = client.stream_ids(server.url, MODEL, {"input_ids": prompt, "max_tokens": 24, "end_id": stop})[0]
    assert got == want[: want.index(stop) + 1]


# Load


def test_32_clients_x_4_requests_none_lost_all_correct_no_slot_leaked(server, reference, runtime_cfg):
    before = gauges(server)
    cases = [
        (prompt_of(1 + (7 * i) % 60, seed=1000 + i, vocab=runtime_cfg.vocab_size), 1 + (5 * i) % 30) for i in range(128)
    ]
    wants = [reference(p, n) for p, n in cases]

    def one_client(c: int) -> list[tuple[int, list[int]]]:
        got = []
        for k in range(4):
            i = 4 * c + k
            prompt, n = cases[i]
            body = {"input_ids": prompt, "max_tokens": n, "end_id": -1}
            if c % 3 == 0:
                ids = client.generate(server.url, MODEL, body)["output_ids"]
                ids = ids if isinstance(ids, list) else [ids]
            elif c % 3 == 1:
                ids = client.stream_ids(server.url, MODEL, body)[0]
            else:
                ids = grpc_stream(
                    server,
                    input_ids=np.array(prompt),
                    max_tokens=np.array([n], np.int32),
                    end_id=np.array([-1], np.int32),
                    stream=np.array([True]),
                )[0]
            got.append((i, ids))
        return got

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(one_client, range(32)) for r in rs]
    seconds = time.perf_counter() - start
    assert sorted(i for i, _ in results) == list(range(128))  # none lost
    wrong = [i for i, ids in results if ids != wants[i]]
    assert not wrong, f"{len(wrong)} responses differ from generate's, e.g. request {wrong[0]}"
    after = settle(server)
    assert after["g2trt_slots_busy"] == 0 and after["g2trt_queue_size"] == 0
    assert after["g2trt_requests_finished"] - before["g2trt_requests_finished"] == 128
    assert after["g2trt_requests_failed"] == before["g2trt_requests_failed"]
    print(f"128 requests from 32 clients in {seconds:.1f} s, {sum(n for _, n in cases) / seconds:.0f} tokens/s")


def test_prefill_chunks_in_a_real_server_give_generates_tokens(
    runtime_inplace_export, runtime_cfg, reference, tmp_path_factory
):
    """`prefill_chunk` 8 through a real server's config: prompts over 8 tokens go in chunks, one prefill call
    between two decode steps, while other requests decode; every response is `generate`'s."""
    chunked = _package(runtime_inplace_export, runtime_cfg, tmp_path_factory, prefill_chunk=8)
    cases = [(prompt_of(9 + (11 * i) % 50, seed=2000 + i, vocab=runtime_cfg.vocab_size), 6 + i % 7) for i in range(16)]

    def one(case: tuple[list[int], int]) -> list[int]:
        return client.stream_ids(server.url, MODEL, {"input_ids": case[0], "max_tokens": case[1], "end_id": -1})[0]

    with TritonServer(chunked, FREE) as server, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, cases))
    assert got == [reference(p, n) for p, n in cases]


# Faults


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 4}, "the prompt is missing"),
        ({"input_ids": [2, 5]}, "max_tokens"),
        ({"input_ids": [], "max_tokens": 4}, "input_ids is empty"),
        ({"text_input": "", "max_tokens": 4}, "text_input is empty"),
        ({"input_ids": [2, 5000], "max_tokens": 4}, "token id 5000 at position 1 is outside the vocabulary [0, 1024)"),
        ({"input_ids": [2, 5], "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"input_ids": [2, 5], "max_tokens": -3}, "max_tokens must be >= 1, got -3"),
        ({"input_ids": [2, 5], "max_tokens": 1023}, "exceeds the cache: 1024 positions"),
        ({"input_ids": [2, 5], "max_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
        # A JSON type error is Triton's HTTP frontend's own message (it does not name the tensor; gRPC's does):
        ({"input_ids": [2, 5.5], "max_tokens": 4}, "attempt to access JSON non-signed-integer as signed-integer"),
    ],
)
def test_malformed_http_requests_get_an_error_naming_the_problem(server, body, message):
    with pytest.raises(client.RequestFailed) as e:
        client.generate(server.url, MODEL, body)
    assert message in str(e.value)
    assert e.value.status == (500 if "JSON" in message else 400)  # Triton's frontend answers its parse errors with 500
    assert client.generate(server.url, MODEL, {"input_ids": [2, 5], "max_tokens": 2})["output_ids"]  # still serving


def test_wrong_dtype_and_missing_input_over_grpc(server):
    with pytest.raises(client.RequestFailed, match=r"input_ids.*FP32|FP32.*input_ids"):
        grpc_stream(server, input_ids=np.array([2.0, 3.0], np.float32), max_tokens=np.array([4], np.int32))
    with pytest.raises(client.RequestFailed, match="max_tokens"):
        grpc_stream(server, input_ids=np.array([2, 3]))
    with pytest.raises(client.RequestFailed, match="outside the vocabulary"):
        grpc_stream(server, input_ids=np.array([2, -1]), max_tokens=np.array([4], np.int32))
    assert grpc_stream(server, input_ids=np.array([2, 3]), max_tokens=np.array([3], np.int32))[0]


def test_clients_that_disconnect_mid_stream_free_their_slots(server):
    before = gauges(server)
    body = json.dumps({"input_ids": [2, 3, 4], "max_tokens": 1000, "end_id": -1, "stream": True})
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=30)
    conn.request("POST", f"/v2/models/{MODEL}/generate_stream", body=body)
    response = conn.getresponse()
    assert b"output_ids" in response.fp.readline() + response.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    ids, _ = grpc_stream(
        server,
        cancel_after=3,
        input_ids=np.array([2, 3, 4]),
        max_tokens=np.array([1000], np.int32),
        end_id=np.array([-1], np.int32),
        stream=np.array([True]),
    )
    assert len(ids) == 3
    after = settle(server)
    assert after["g2trt_requests_cancelled"] - before["g2trt_requests_cancelled"] == 2
    assert after["g2trt_slots_busy"] == 0


# Starting and stopping (servers of their own)


def g2trt_serve(repo: Path, *extra: str) -> subprocess.Popen:
    args = ["serve", str(repo), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("broken", ["weights", "graph"])
def test_a_model_that_cannot_load_fails_serve_fast_with_one_line(repo, tmp_path, broken):
    """weights: the server starts and the model fails to load in it; graph: the repository check refuses it."""
    bad = tmp_path / "repo"
    shutil.copytree(repo, bad, symlinks=True)
    target = bad / MODEL / "1" / ("model.onnx.data" if broken == "weights" else "model.onnx")
    target.unlink()
    target.write_bytes(b"not a model")
    start = time.perf_counter()
    proc = g2trt_serve(bad, "--quiet")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert ("onnxruntime cannot load it" if broken == "weights" else "unreadable ONNX") in lines[0], lines[0]
    assert "model.onnx" in lines[0]
    assert time.perf_counter() - start < 60


def test_a_server_that_never_gets_ready_is_stopped_at_the_timeout(repo, tmp_path):
    stuck = tmp_path / "repo"
    shutil.copytree(repo, stuck, symlinks=True)
    model_py = stuck / MODEL / "1" / "model.py"
    model_py.write_text(
        model_py.read_text().replace(
            "self.model = GenerateModel", "import time; time.sleep(600); self.model = GenerateModel"
        )
    )
    server = TritonServer(stuck, ServerOptions(http_port=0, grpc_port=0, metrics_port=0, ready_timeout=8, grace=3))
    start = time.perf_counter()
    with pytest.raises(ServeError, match="not ready after 8 s"):
        server.start()
    assert time.perf_counter() - start < 30
    assert not group_alive(server.proc.pid) and not leftover_regions(server.shm_prefix)


def test_sigterm_stops_serve_with_nothing_left_behind(repo):
    before_default = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    proc = g2trt_serve(repo, "--quiet")
    deadline = time.monotonic() + 90
    url = None
    while url is None and time.monotonic() < deadline:  # the ready table names the HTTP address
        line = proc.stderr.readline()
        if "HTTP" in line and "http://" in line:
            url = line.split("http://")[1].split("/")[0]
    assert url, "g2trt serve never printed its address"
    assert client.generate(f"http://{url}", MODEL, {"input_ids": [2, 3], "max_tokens": 2})["output_ids"]
    children = _descendants(proc.pid)
    assert any("tritonserver" in c for c in children.values()) and any("stub" in c for c in children.values())
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    left = [pid for pid in children if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
    assert not left, {pid: children[pid] for pid in left}
    assert not list(Path("/dev/shm").glob(f"g2trt_{proc.pid}_*"))
    assert set(Path("/dev/shm").glob("triton_python_backend_shm_region_*")) <= before_default


def _descendants(pid: int) -> dict[int, str]:
    """Every process under `pid` (by parent id), with its command line."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                procs[int(entry.name)] = (
                    int(stat.rsplit(")", 1)[1].split()[1]),
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(),
                )
            except OSError:
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmd) in procs.items():
            if ppid == parent and child not in found:
                found[child] = cmd
                frontier.append(child)
    return found


def _state(pid: int) -> str:
    try:
        return "zombie" if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z") else "alive"
    except OSError:
        return "zombie"

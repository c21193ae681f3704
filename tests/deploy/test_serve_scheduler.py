"""The serving scheduler and the model logic behind Triton's model.py, without a server.

A fake slot model makes the scheduling observable (which slots each step ran); the real runner shows
the served tokens equal `generate`'s; a stand-in for `triton_python_backend_utils` drives
`GenerateModel` exactly as the Python backend does (execute, response senders, FINAL flags).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deploy.generate.loop import GenerationConfig, generate
from deploy.generate.sampling import SamplingConfig
from deploy.generate.tokenizer import load_tokenizer, write_id_tokenizer
from deploy.runners.ort_runner import OrtRunner
from deploy.serve.generate_model import package_repository
from deploy.serve.protocol import GenerateRequest, Limits, RequestError, parse_request
from deploy.serve.runtime import ServingParams
from deploy.serve.scheduler import Scheduler, SinkClosed
from deploy.serve.slot_model import InPlaceSlots, RunnerSlots
from deploy.serve.triton_model import GenerateModel, IncrementalText

VOCAB = 32


class FakeModel:
    """Logits that make greedy decoding predictable: next token = (last token + 1) % VOCAB."""

    def __init__(self, slots: int, step_s: float = 0.0) -> None:
        self.slots, self.max_len, self.step_s = slots, 64, step_s
        self.last: dict[int, int] = {}
        self.decodes: list[list[int]] = []
        self.released: list[int] = []
        self.fail_on: int | None = None  # a token that makes decode raise

    def _logits(self, token: int) -> np.ndarray:
        row = np.zeros(VOCAB, dtype=np.float32)
        row[(token + 1) % VOCAB] = 1
        return row

    def prefill(self, slot: int, prompt) -> np.ndarray:
        assert slot not in self.last, f"slot {slot} taken twice"
        self.last[slot] = prompt[-1]
        return self._logits(prompt[-1])

    def decode(self, slots, tokens) -> np.ndarray:
        time.sleep(self.step_s)
        self.decodes.append(list(slots))
        if self.fail_on is not None and self.fail_on in tokens:
            raise RuntimeError("boom")
        return np.stack([self._logits(t) for t in tokens])

    def release(self, slot: int) -> None:
        self.last.pop(slot, None)
        self.released.append(slot)


class ListSink:
    def __init__(self, cancel_after: int | None = None, close_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.closed = False
        self.cancel_after, self.close_after = cancel_after, close_after
        self.done = threading.Event()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after

    def emit(self, token: int, finish: str | None) -> None:
        if self.close_after is not None and len(self.tokens) >= self.close_after:
            raise SinkClosed("client gone")
        self.tokens.append(token)
        if finish:
            self.finish = finish
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def close(self) -> None:
        self.closed = True
        self.done.set()


def request(prompt, max_tokens, stop=(), **sampling) -> GenerateRequest:
    return GenerateRequest(tuple(prompt), max_tokens, SamplingConfig(**sampling), frozenset(stop), stream=True)


def run_all(scheduler: Scheduler, jobs: list[tuple[GenerateRequest, ListSink]], timeout: float = 10) -> None:
    for r, sink in jobs:
        scheduler.submit(r, sink)
    for _, sink in jobs:
        assert sink.done.wait(timeout), "a request never ended"


def test_more_requests_than_slots_all_finish_and_free_their_slots():
    model = FakeModel(slots=3)
    scheduler = Scheduler(model).start()
    jobs = [(request([i], max_tokens=2 + i % 5), ListSink()) for i in range(10)]
    run_all(scheduler, jobs)
    for (r, sink), i in zip(jobs, range(10), strict=True):
        assert sink.tokens == [(i + k + 1) % VOCAB for k in range(r.max_tokens)] and sink.finish == "length"
    assert max(len(d) for d in model.decodes) == 3  # decode steps ran every active slot, never more
    s = scheduler.stats()
    assert (s.busy, s.queued, s.admitted, s.finished, s.peak_busy) == (0, 0, 10, 10, 3)
    assert model.last == {} and sorted(set(model.released)) == [0, 1, 2]
    scheduler.stop()


def test_a_request_joins_the_running_batch_at_the_next_step():
    model = FakeModel(slots=4, step_s=0.01)
    scheduler = Scheduler(model).start()
    long, late = ListSink(), ListSink()
    scheduler.submit(request([0], max_tokens=30), long)
    time.sleep(0.1)
    scheduler.submit(request([10], max_tokens=3), late)
    assert long.done.wait(5) and late.done.wait(5)
    joined = [d for d in model.decodes if len(d) == 2]
    assert joined and len(joined) == 2  # the late request's 2 decode steps ran with the long one
    assert late.tokens == [11, 12, 13]
    scheduler.stop()


def test_stop_tokens_cancellation_disconnects_and_errors_free_slots():
    model = FakeModel(slots=2)
    model.fail_on = 20
    scheduler = Scheduler(model).start()
    stop, cancelled, gone, failing = ListSink(), ListSink(cancel_after=2), ListSink(close_after=3), ListSink()
    jobs = [
        (request([0], max_tokens=10, stop=[3]), stop),
        (request([5], max_tokens=50), cancelled),
        (request([5], max_tokens=50), gone),
    ]
    run_all(scheduler, jobs)
    run_all(scheduler, [(request([18], max_tokens=50), failing)])  # a failed step fails every request in it
    assert stop.tokens == [1, 2, 3] and stop.finish == "stop"
    assert cancelled.closed and cancelled.tokens == [6, 7]
    assert gone.closed and gone.tokens == [6, 7, 8]
    assert failing.error and "decode step failed: RuntimeError: boom" in failing.error
    s = scheduler.stats()
    assert (s.busy, s.finished, s.cancelled, s.failed) == (0, 1, 2, 1)
    ok = ListSink()
    run_all(scheduler, [(request([1], max_tokens=2), ok)])  # still serving
    assert ok.tokens == [2, 3]
    scheduler.stop()


def test_queue_limit_and_stop_fail_waiting_requests():
    model = FakeModel(slots=1, step_s=0.02)
    scheduler = Scheduler(model, max_queue=2).start()
    sinks = [ListSink() for _ in range(3)]
    scheduler.submit(request([0], max_tokens=1000), sinks[0])
    while scheduler.stats().busy < 1:
        time.sleep(0.005)
    for sink in sinks[1:]:
        scheduler.submit(request([0], max_tokens=1000), sink)
    with pytest.raises(RequestError, match="queue is full"):
        scheduler.submit(request([0], max_tokens=1), ListSink())
    time.sleep(0.05)
    scheduler.stop()
    assert all(s.error == "the model is shutting down" for s in sinks)
    assert scheduler.stats().busy == 0 and model.last == {}
    with pytest.raises(RequestError, match="shutting down"):
        scheduler.submit(request([0], max_tokens=1), ListSink())


def test_sampled_tokens_depend_on_the_seed_not_on_the_neighbours():
    class Uniform(FakeModel):
        def _logits(self, token: int) -> np.ndarray:
            return np.zeros(VOCAB, dtype=np.float32)

    def sample(n_others: int) -> list[int]:
        scheduler = Scheduler(Uniform(slots=4)).start()
        mine = ListSink()
        jobs = [(request([1], 12, temperature=1.0, seed=7), mine)]
        jobs += [(request([2], 12, temperature=1.0, seed=i), ListSink()) for i in range(n_others)]
        run_all(scheduler, jobs)
        scheduler.stop()
        return mine.tokens

    alone = sample(0)
    assert len(set(alone)) > 3
    assert sample(3) == alone


# The real model: slots give the tokens `g2trt generate` gives.


@pytest.fixture(scope="module")
def ort_runner(runtime_export, runtime_cfg) -> OrtRunner:
    return OrtRunner(runtime_export.model_path, runtime_cfg, threads=1)


@pytest.fixture(scope="module")
def prompts(runtime_cfg) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, runtime_cfg.vocab_size, n).tolist() for n in (5, runtime_cfg.sliding_window + 7, 11)]


@pytest.fixture(scope="module")
def expected(ort_runner, prompts) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=24, stop_tokens=())
    tokens = [generate(ort_runner, [p], config).tokens[0] for p in prompts]
    assert all(len(set(t)) >= 6 for t in tokens), tokens  # tokens vary: a cache bug would show
    return tokens


def test_runner_slots_give_generates_tokens(ort_runner, prompts, expected):
    scheduler = Scheduler(RunnerSlots(ort_runner, slots=2, max_len=128)).start()
    jobs = [(request(p, 24), ListSink()) for p in prompts]
    run_all(scheduler, jobs, timeout=60)
    assert [s.tokens for _, s in jobs] == expected
    scheduler.stop()


@pytest.mark.parametrize("chunking", ["runner", "serving"])
@pytest.mark.parametrize("target", ["plain", "ort"])
def test_in_flight_batching_gives_generates_tokens(
    target, chunking, runtime_inplace_export, runtime_cfg, prompts, expected, tmp_path
):
    """The in-place runtime: requests join the running batch, each at its own position, slots are reused;
    a long prompt goes in chunks with decode steps of the other requests between them. Chunks of 4 either
    from the runner (`generate`'s rule: prompts over 8 tokens; every prefilling request one call per
    iteration) or from serving's `prefill_chunk` (prompts over 4; one prefill call between two steps)."""
    from deploy.runners.factory import graph_contract
    from deploy.runners.ort_runner import OrtInplaceRunner
    from export.manifest import read_manifest
    from graph_passes import optimize

    path = runtime_inplace_export.model_path
    if target != "plain":
        path = optimize(path, target, tmp_path / target).model_path
    _, full = graph_contract(read_manifest(path))
    serving = chunking == "serving"
    runner = OrtInplaceRunner(path, runtime_cfg, threads=1, full_sliding=full, prefill_chunk=None if serving else 4)
    model = InPlaceSlots(runner, slots=2, max_len=128, prefill_chunk=4 if serving else "auto")
    calls: list[tuple] = []  # ("prefill", slot, prompt length) / ("decode", slots) / ("release", slot)
    prefill, decode, release = model.prefill, model.decode, model.release

    def logged_prefill(slot, prompt):
        calls.append(("prefill", slot, len(prompt)))
        return prefill(slot, prompt)

    def logged_decode(slots, tokens):
        calls.append(("decode", tuple(slots)))
        return decode(slots, tokens)

    def logged_release(slot):
        calls.append(("release", slot))
        return release(slot)

    model.prefill, model.decode, model.release = logged_prefill, logged_decode, logged_release  # type: ignore[method-assign]
    scheduler = Scheduler(model, prefill_calls_per_step=1 if serving else None).start()
    jobs = [(request(p, 24), ListSink()) for p in [*prompts, *prompts]]  # 6 requests through 2 slots
    run_all(scheduler, jobs, timeout=120)
    assert [s.tokens for _, s in jobs] == expected * 2
    assert max(len(c[1]) for c in calls if c[0] == "decode") == 2  # both decoding slots in one step

    def chunks(n: int) -> int:
        return (n + 3) // 4 if n > (4 if serving else 8) else 1

    # replay: chunks left per slot (None: free, 0: decoding). A decode step while a slot below its top row
    # is between two chunks steps that row with a pad at its next position, which the next chunk overwrites
    left: dict[int, int | None] = {0: None, 1: None}
    between_chunks = []
    for i, call in enumerate(calls):
        if call[0] == "prefill":
            slot, n = call[1:]
            left[slot] = (chunks(n) if left[slot] is None else left[slot]) - 1  # type: ignore[operator]
            if serving and 0 in left.values():  # someone decodes: one prefill call, then their step
                assert next(c for c in calls[i + 1 :] if c[0] != "release")[0] == "decode"
        elif call[0] == "decode":
            between_chunks += [s for s, k in left.items() if k and s < max(call[1])]
            assert all(left[s] == 0 for s in call[1])  # only slots whose prompt is all in decode
        else:
            left[call[1]] = None
    assert between_chunks  # a long prompt's chunks had decode steps between them, its row stepped too
    assert sum(c[0] == "prefill" and c[2] == 23 for c in calls) == 2 * 6  # six chunks each
    stats = scheduler.stats()
    assert stats.busy == 0  # no slot leaked
    assert stats.prefill_calls == 2 * sum(chunks(len(p)) for p in prompts)  # one call per chunk
    scheduler.stop()


# GenerateModel under a stand-in for triton_python_backend_utils.


class FakeTensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self._name, self.value = name, np.asarray(value)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.value


class FakeResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code=None) -> None:
        self.message, self.code = message, code


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[FakeResponse | None, int]] = []
        self.final = threading.Event()
        self.cancel = False

    def send(self, response=None, flags=0) -> None:
        assert not self.final.is_set(), "sent after FINAL"
        self.sent.append((response, flags))
        if flags & FakePb.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.final.set()

    def is_cancelled(self) -> bool:
        return self.cancel


class FakeRequest:
    def __init__(self, **inputs) -> None:
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self.sender = FakeSender()

    def get_response_sender(self) -> FakeSender:
        return self.sender


class FakePb:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    Tensor = FakeTensor
    InferenceResponse = FakeResponse
    TritonError = FakeError

    @staticmethod
    def get_input_tensor_by_name(request: FakeRequest, name: str):
        return request.inputs.get(name)


@pytest.fixture(scope="module")
def served(runtime_export, runtime_cfg, tmp_path_factory) -> GenerateModel:
    src = tmp_path_factory.mktemp("gen-src")
    for f in runtime_export.model_path.parent.iterdir():
        (src / f.name).symlink_to(f)
    write_id_tokenizer(runtime_cfg, src)
    repo = tmp_path_factory.mktemp("gen-repo")
    _, gen = package_repository(src, repo, params=ServingParams(slots=2, max_len=96, threads=1))
    assert gen is not None
    config = (gen.model_dir / "config.pbtxt").read_text()
    args = {
        "model_config": json.dumps(_config_json(config)),
        "model_repository": str(gen.model_dir),
        "model_version": "1",
        "model_name": gen.model_dir.name,
    }
    model = GenerateModel(args, FakePb)
    yield model
    model.finalize()


def _config_json(text: str) -> dict:
    """Triton hands `initialize` the config as JSON; parameters are what GenerateModel reads from it."""
    from google.protobuf import json_format

    from deploy.serve import triton_config as tc

    return json_format.MessageToDict(tc.parse(text), preserving_proto_field_name=True)


def wait(req: FakeRequest) -> list[tuple[FakeResponse | None, int]]:
    assert req.sender.final.wait(60), "no FINAL response"
    return req.sender.sent


def test_model_streams_one_response_per_token_and_ends_final(served, prompts, expected):
    req = FakeRequest(
        input_ids=np.array(prompts[0]),
        max_tokens=np.array([24], np.int32),
        end_id=np.array([-1], np.int32),
        stream=np.array([True]),
    )
    served.execute([req])
    sent = wait(req)
    assert len(sent) == 24 and [f for _, f in sent] == [0] * 23 + [1]
    assert [int(r.outputs["output_ids"][0]) for r, _ in sent] == expected[0]
    pieces = "".join(r.outputs["text_output"][0].decode() for r, _ in sent)
    assert pieces == load_tokenizer(served_tokenizer(served)).decode(expected[0])


def test_model_with_prefill_chunks_streams_the_same_tokens(runtime_inplace_export, runtime_cfg, tmp_path, prompts):
    """The `prefill_chunk` parameter reaches the slot model and the scheduler: chunks of 4 for the in-place
    graph's 23-token prompt, one prefill call between two decode steps, the tokens of `generate`."""
    src = tmp_path / "src"
    src.mkdir()
    for f in runtime_inplace_export.model_path.parent.iterdir():
        (src / f.name).symlink_to(f)
    write_id_tokenizer(runtime_cfg, src)
    params = ServingParams(slots=2, max_len=96, threads=1, prefill_chunk=4)
    _, gen = package_repository(src, tmp_path / "repo", params=params)
    assert gen is not None
    args = {
        "model_config": json.dumps(_config_json((gen.model_dir / "config.pbtxt").read_text())),
        "model_repository": str(gen.model_dir),
        "model_version": "1",
        "model_name": gen.model_dir.name,
    }
    model = GenerateModel(args, FakePb)
    try:
        assert model.scheduler.prefill_calls_per_step == 1 and model.scheduler.model.prefill_chunk == 4
        runner = model.scheduler.model.runner  # type: ignore[attr-defined]
        want = generate(runner, [prompts[1]], GenerationConfig(max_new_tokens=12, stop_tokens=())).tokens[0]
        req = FakeRequest(input_ids=np.array(prompts[1]), max_tokens=np.array([12], np.int32),
                          end_id=np.array([-1], np.int32), stream=np.array([True]))  # fmt: skip
        model.execute([req])
        assert [int(r.outputs["output_ids"][0]) for r, _ in wait(req)] == want
        assert model.scheduler.stats().prefill_calls == 6  # 23 tokens in chunks of 4
    finally:
        model.finalize()


def served_tokenizer(model: GenerateModel) -> Path:
    assert model.tokenizer is not None
    return model.tokenizer.path


def test_model_answers_once_without_stream_and_takes_text(served, expected, prompts):
    text = " ".join(f"t{t}" for t in prompts[2])
    req = FakeRequest(
        text_input=np.array([text.encode()], dtype=object),
        max_tokens=np.array([24], np.int32),
        end_id=np.array([-1], np.int32),
    )
    served.execute([req])
    ((response, flags),) = wait(req)
    bos = served.config.bos_token_id
    want = generate(
        served.scheduler.model.runner, [[bos, *prompts[2]]], GenerationConfig(max_new_tokens=24, stop_tokens=())
    ).tokens[0]
    assert flags == 1 and response.outputs["output_ids"].tolist() == want
    assert response.outputs["text_output"][0].decode() == " ".join(f"t{t}" for t in want)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"max_tokens": np.array([4], np.int32)}, "the prompt is missing"),
        ({"input_ids": np.array([1, 2])}, "max_tokens is missing"),
        ({"input_ids": np.array([], np.int64), "max_tokens": np.array([4], np.int32)}, "input_ids is empty"),
        (
            {"input_ids": np.array([1.5]), "max_tokens": np.array([4], np.int32)},
            "input_ids: expected INT64, got float64",
        ),
        (
            {"input_ids": np.array([1, 4096]), "max_tokens": np.array([4], np.int32)},
            "token id 4096 at position 1 is outside the vocabulary",
        ),
        ({"input_ids": np.array([1]), "max_tokens": np.array([0], np.int32)}, "max_tokens must be >= 1, got 0"),
        ({"input_ids": np.array([1, 2]), "max_tokens": np.array([95], np.int32)}, "exceeds the cache: 96 positions"),
        ({"text_input": np.array([b"  "], dtype=object), "max_tokens": np.array([4], np.int32)}, "text_input is empty"),
        (
            {"input_ids": np.array([1]), "max_tokens": np.array([4], np.int32), "top_p": np.array([0.0], np.float32)},
            "top_p must be in (0, 1]",
        ),
        (
            {"input_ids": np.array([1]), "max_tokens": np.array([4], np.int32), "end_id": np.array([5000], np.int32)},
            "end_id: token id 5000",
        ),
    ],
)
def test_bad_requests_get_one_error_response_naming_the_problem(served, inputs, message):
    req = FakeRequest(**inputs)
    served.execute([req])
    ((response, flags),) = wait(req)
    assert flags == 1 and message in response.error.message and response.error.code == "INVALID_ARG"


def test_a_cancelled_request_frees_its_slot(served):
    req = FakeRequest(
        input_ids=np.array([1, 2, 3]),
        max_tokens=np.array([80], np.int32),
        end_id=np.array([-1], np.int32),
        stream=np.array([True]),
    )
    before = served.scheduler.stats().cancelled
    served.execute([req])
    while len(req.sender.sent) < 3:
        time.sleep(0.005)
    req.sender.cancel = True
    sent = wait(req)
    assert sent[-1] == (None, 1) and len(sent) < 80
    s = served.scheduler.stats()
    assert s.cancelled == before + 1 and s.busy == 0


def test_incremental_text_holds_back_partial_characters():
    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", "replace")

    text = IncrementalText(Bytes())  # type: ignore[arg-type]
    pieces = [text.push(b) for b in "aé€".encode()]
    assert "".join(pieces) == "aé€" and "\ufffd" not in "".join(pieces)


def test_parse_request_limits():
    limits = Limits(vocab_size=10, max_len=8, eos_ids=(1,))

    def get_of(**kw):
        return lambda name: kw.get(name)

    r = parse_request(get_of(input_ids=np.array([2, 3]), max_tokens=np.array([6], np.int32)), limits, None)
    assert r.prompt == (2, 3) and r.stop_ids == {1} and not r.stream and r.sampling.greedy
    r = parse_request(
        get_of(
            input_ids=np.array([2]),
            max_tokens=np.array([1], np.int32),
            end_id=np.array([-1], np.int32),
            stop_ids=np.array([4, 5], np.int32),
        ),
        limits,
        None,
    )
    assert r.stop_ids == {4, 5}
    with pytest.raises(RequestError, match="needs a tokenizer"):
        parse_request(
            get_of(text_input=np.array([b"hi"], dtype=object), max_tokens=np.array([1], np.int32)), limits, None
        )
    with pytest.raises(RequestError, match="not both"):
        parse_request(get_of(text_input=np.array([b"hi"], dtype=object), input_ids=np.array([2])), limits, None)

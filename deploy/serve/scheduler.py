"""The serving loop: a thread that owns the cache slots, admits queued requests and streams their tokens.

    submit() ─> queue ─> [admit: free slot?] ─> [prefill: the prompt, or its next chunk] ─> first token
                                                    ▲ a long prompt: one chunk per iteration ┘   │
                                                                                                 ▼
                           [decode step: every decoding slot, next token] ◄─ every iteration ────┘
                           until stop token, max_tokens, cancellation or an error frees the slot

One thread does all model work, so the model needs no locks; `submit` (Triton's execute thread) only
appends to the queue. Each iteration admits as many queued requests as there are free slots, runs one
prefill call for each request still prefilling (its whole prompt, or, where the model prefills in
chunks, its next chunk; the last yields its first token), then one decode step over all decoding slots
(`SlotModel.decode`): a request that arrives while others decode joins them once its prompt is in, a
long prompt holds the others up one chunk at a time rather than for its whole prefill, and a finished
request leaves at once. Per request: its own sampler seed, stop ids and token budget,
so a request's tokens do not depend on what else is running (greedy: identical to `g2trt generate`).

Where results go is a `Sink` per request (the Triton response sender in production, a list in tests):
`emit` each token (a `finish` reason on the last), `fail` with a message, or `close` when the client
went away. A sink whose client is gone (cancelled, or `emit` raising `SinkClosed`) frees its slot
before the next step spends time on it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from deploy.generate.sampling import next_tokens
from deploy.serve.protocol import GenerateRequest, RequestError
from deploy.serve.slot_model import SlotModel


class SinkClosed(Exception):
    """The client is gone (disconnected or cancelled); nothing more can be sent."""


class Sink(Protocol):
    def cancelled(self) -> bool: ...

    def emit(self, token: int, finish: str | None) -> None:
        """One new token; `finish` ("stop" or "length") on the last. May raise `SinkClosed`."""
        ...

    def fail(self, message: str) -> None:
        """End the request with an error response."""
        ...

    def close(self) -> None:
        """End a cancelled request's stream without a response."""
        ...


@dataclasses.dataclass
class Stats:
    slots: int
    busy: int = 0  # slots holding a request now
    queued: int = 0
    admitted: int = 0
    finished: int = 0  # ended by a stop token or max_tokens
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # refused at submit (queue full, shutting down)
    steps: int = 0  # decode steps run
    prefill_calls: int = 0  # prefill calls run (a prompt prefilled in chunks takes one per chunk)
    peak_busy: int = 0


@dataclasses.dataclass(eq=False)
class Job:
    id: int
    request: GenerateRequest
    sink: Sink
    rng: np.random.Generator
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(
        self,
        model: SlotModel,
        *,
        max_queue: int = 1024,
        on_change: Callable[[Stats], None] | None = None,
        log: Callable[[str], None] | None = None,
        prefill_calls_per_step: int | None = None,
    ) -> None:
        """`prefill_calls_per_step`: prefill calls between two decode steps, oldest request first (None: one
        for every request still prefilling); with chunks of K tokens, 1 bounds that stall to K tokens."""
        self.model = model
        self.prefill_calls_per_step = prefill_calls_per_step
        self.max_queue = max_queue
        self._on_change = on_change
        self._log = log or (lambda _msg: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # slot -> job
        self._free = list(range(model.slots))[::-1]  # pop() takes the lowest slot
        self._stats = Stats(model.slots)
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="g2trt-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, request: GenerateRequest, sink: Sink) -> None:
        """Queue `request`; its tokens go to `sink`. Raises `RequestError` when it cannot be queued."""
        with self._cond:
            if self._stopping:
                self._stats.rejected += 1
                raise RequestError("the model is shutting down")
            if len(self._queue) >= self.max_queue:
                self._stats.rejected += 1
                raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            job = Job(next(self._ids), request, sink, np.random.default_rng(request.sampling.seed))
            self._queue.append(job)
            self._stats.queued = len(self._queue)
            self._cond.notify()
        self._changed()

    def stats(self) -> Stats:
        with self._cond:
            return dataclasses.replace(self._stats)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; every queued or running request gets an error response."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            leftover = list(self._queue) + list(self._active.values())
            self._queue.clear()
        for job in leftover:
            self._end(job, "failed", "the model is shutting down")

    # The scheduler thread.

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                admit = [self._queue.popleft() for _ in range(min(len(self._free), len(self._queue)))]
                self._stats.queued = len(self._queue)
            for job in admit:
                self._admit(job)
            prefilling = sorted((j for j in self._active.values() if not j.tokens), key=lambda j: j.id)
            for job in prefilling[: self.prefill_calls_per_step]:
                self._prefill(job)
            if self._active:
                self._decode()

    def _admit(self, job: Job) -> None:
        if job.sink.cancelled():
            self._end(job, "cancelled")
            return
        with self._cond:
            job.slot = self._free.pop()
            self._active[job.slot] = job
            self._stats.admitted += 1
            self._stats.busy = len(self._active)
            self._stats.peak_busy = max(self._stats.peak_busy, self._stats.busy)
        self._changed()

    def _prefill(self, job: Job) -> None:
        """One prefill call: the prompt, or its next chunk; its first token once the prompt is in."""
        if job.sink.cancelled():
            self._end(job, "cancelled")
            return
        assert job.slot is not None
        try:
            logits = self.model.prefill(job.slot, job.request.prompt)
        except Exception as e:  # a model error fails this request, not the server
            self._end(job, "failed", f"prefill failed: {_one_line(e)}")
            return
        with self._cond:
            self._stats.prefill_calls += 1
        if logits is not None:
            self._advance(job, logits)

    def _decode(self) -> None:
        jobs = []
        for job in list(self._active.values()):
            if job.sink.cancelled():
                self._end(job, "cancelled")
            elif job.tokens:  # the others are still prefilling
                jobs.append(job)
        if not jobs:
            return
        try:
            logits = self.model.decode([j.slot for j in jobs], [j.tokens[-1] for j in jobs])  # type: ignore[misc]
        except Exception as e:
            for job in jobs:
                self._end(job, "failed", f"decode step failed: {_one_line(e)}")
            return
        with self._cond:
            self._stats.steps += 1
        for job, row in zip(jobs, logits, strict=True):
            self._advance(job, row)

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """Sample the job's next token from `logits [V]`, send it, and end the job if it is done."""
        token = int(next_tokens(logits[None], job.request.sampling, job.rng)[0])
        job.tokens.append(token)
        finish = (
            "stop" if token in job.request.stop_ids else "length" if len(job.tokens) >= job.request.max_tokens else None
        )
        try:
            job.sink.emit(token, finish)
        except SinkClosed:
            self._end(job, "cancelled")
            return
        if finish is not None:
            self._end(job, "finished")

    def _end(self, job: Job, outcome: str, message: str = "") -> None:
        """Free the job's slot (if it has one), count the outcome and close its sink."""
        if job.slot is not None:
            self.model.release(job.slot)
        with self._cond:
            if job.slot is not None and self._active.get(job.slot) is job:
                del self._active[job.slot]
                self._free.append(job.slot)
                self._free.sort(reverse=True)
            job.slot = None
            setattr(self._stats, outcome, getattr(self._stats, outcome) + 1)
            self._stats.busy = len(self._active)
        if outcome == "failed":
            self._log(f"request {job.id} failed: {message}")
            job.sink.fail(message)
        elif outcome == "cancelled":
            job.sink.close()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.stats())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__

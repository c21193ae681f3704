"""The logic of the Triton Python-backend generation model; its `model.py` only forwards to `GenerateModel`.

    initialize(args)   read config.pbtxt's parameters and g2trt.json, open the runtime (TensorRT when the
                       model holds an engine and the machine a GPU, else onnxruntime, CUDA EP first when
                       present), the tokenizer, and start the slot scheduler
    execute(requests)  per request: check its tensors (`deploy.serve.protocol`), queue it; a bad request
                       gets one error response naming the problem; returns None (decoupled)
    finalize()         stop the scheduler: running and queued requests get an error response

Responses leave through each request's response sender, from the scheduler thread: one per token when
the request asks to `stream`, else one at the end; the last carries the FINAL flag. `pb_utils` is passed
in, so tests drive this class with a stand-in and no server.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deploy.generate.tokenizer import Tokenizer
from deploy.serve.protocol import GenerateRequest, Limits, RequestError, parse_request
from deploy.serve.runtime import ServingParams, open_slot_model
from deploy.serve.scheduler import Scheduler, SinkClosed, Stats


class IncrementalText:
    """The text of a growing token list as pieces: what each new token adds to the decoded whole.

    Decoding token by token breaks words that span tokens (and multi-byte characters); decoding the
    whole list and sending the new suffix does not. A piece is held back while the text ends in an
    incomplete character (U+FFFD) or does not extend what was sent.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int, last: bool = False) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.sent) or (text.endswith("\ufffd") and not last):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class TritonSink:
    """One request's response sender as a scheduler `Sink`."""

    def __init__(self, pb: Any, sender: Any, parsed: GenerateRequest, tokenizer: Tokenizer | None) -> None:
        self.pb = pb
        self.sender = sender
        self.stream = parsed.stream
        self.tokens: list[int] = []
        self.text = IncrementalText(tokenizer) if tokenizer is not None else None

    def cancelled(self) -> bool:
        try:
            return bool(self.sender.is_cancelled())
        except Exception:  # a sender that cannot even answer this has no client left
            return True

    def emit(self, token: int, finish: str | None) -> None:
        self.tokens.append(token)
        piece = self.text.push(token, last=finish is not None) if self.text is not None else None
        if self.stream:
            self._send(self._response([token], piece), finish is not None)
        elif finish is not None:
            self._send(self._response(self.tokens, self.text.sent if self.text is not None else None), True)

    def fail(self, message: str) -> None:
        error = self.pb.TritonError(message)
        with contextlib.suppress(Exception):  # the client is gone: nobody to tell
            self.sender.send(self.pb.InferenceResponse(error=error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _response(self, tokens: list[int], text: str | None) -> Any:
        outputs = [self.pb.Tensor("output_ids", np.asarray(tokens, dtype=np.int64))]
        if text is not None:
            outputs.append(self.pb.Tensor("text_output", np.asarray([text.encode("utf-8")], dtype=np.object_)))
        return self.pb.InferenceResponse(output_tensors=outputs)

    def _send(self, response: Any, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            self.sender.send(response, flags=flags)
        except Exception as e:  # the stub raises once the client has gone
            raise SinkClosed(str(e)) from None


class GenerateModel:
    def __init__(self, args: dict[str, str], pb: Any) -> None:
        self.pb = pb
        self.name = args.get("model_name", "generate")
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / str(args.get("model_version", "1"))
        params = ServingParams.from_config(config, str(model_dir / "config.pbtxt"))
        opened = open_slot_model(model_dir, version_dir, params)
        self.config = opened.config
        self.tokenizer = opened.tokenizer
        self.limits = Limits(self.config.vocab_size, opened.model.max_len, tuple(self.config.eos_token_id))
        self._metrics = _Metrics(pb, self.name, self._log)
        self.scheduler = Scheduler(
            opened.model,
            max_queue=params.max_queue,
            on_change=self._metrics.update,
            log=self._log,
            prefill_calls_per_step=1 if params.prefill_chunk else None,  # at most one chunk between two steps
        )
        self._metrics.update(self.scheduler.stats())
        self.scheduler.start()
        self._log(
            f"{self.name}: {opened.description}; {params.slots} slots x {opened.model.max_len} positions; "
            f"tokenizer: {'yes' if self.tokenizer else 'none (input_ids only)'}"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
        s = self.scheduler.stats()
        self._log(f"{self.name}: stopped; {stats_line(s)}")

    def _submit(self, request: Any) -> None:
        def get(name: str) -> np.ndarray | None:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        sender = request.get_response_sender()  # one per request: every answer, error or token, goes through it
        try:
            parsed = parse_request(get, self.limits, self.tokenizer)
            self.scheduler.submit(parsed, TritonSink(self.pb, sender, parsed, self.tokenizer))
        except RequestError as e:
            self._refuse(sender, str(e), "INVALID_ARG")
        except Exception as e:  # a bug here must answer the request, not leave its client waiting
            self._refuse(sender, f"internal error: {type(e).__name__}: {e}", "INTERNAL")

    def _refuse(self, sender: Any, message: str, code: str) -> None:
        error = self.pb.TritonError(message, getattr(self.pb.TritonError, code, None))
        with contextlib.suppress(Exception):
            sender.send(self.pb.InferenceResponse(error=error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _log(self, message: str) -> None:
        logger = getattr(self.pb, "Logger", None)
        if logger is not None:
            logger.log_info(f"g2trt: {message}")
        else:
            print(f"g2trt: {message}", flush=True)


def stats_line(s: Stats) -> str:
    return (
        f"slots busy {s.busy}/{s.slots} (peak {s.peak_busy}), queued {s.queued}, admitted {s.admitted}, "
        f"finished {s.finished}, cancelled {s.cancelled}, failed {s.failed}, rejected {s.rejected}, steps {s.steps}, "
        f"prefill calls {s.prefill_calls}"
    )


class _Metrics:
    """Slot occupancy as Triton custom metrics (gauges on the server's /metrics), when metrics are on."""

    GAUGES: ClassVar[dict[str, tuple[str, str]]] = {  # Stats field -> (metric, description)
        "slots": ("g2trt_slots_total", "cache slots of the model"),
        "busy": ("g2trt_slots_busy", "slots holding a request"),
        "queued": ("g2trt_queue_size", "requests waiting for a slot"),
        "admitted": ("g2trt_requests_admitted", "requests admitted to a slot"),
        "finished": ("g2trt_requests_finished", "requests ended by a stop token or max_tokens"),
        "cancelled": ("g2trt_requests_cancelled", "requests whose client went away"),
        "failed": ("g2trt_requests_failed", "requests ended by an error after admission"),
    }

    def __init__(self, pb: Any, model: str, log: Callable[[str], None]) -> None:
        self.metrics: dict[str, Any] = {}
        self.families: list[Any] = []  # a family dropped is a family unregistered
        family = getattr(pb, "MetricFamily", None)
        if family is None:
            return
        try:
            for key, (name, description) in self.GAUGES.items():
                fam = family(name=name, description=description, kind=family.GAUGE)
                self.families.append(fam)
                self.metrics[key] = fam.Metric(labels={"model": model})
        except Exception as e:  # metrics disabled on this server
            log(f"no slot metrics ({e}); the stats line at unload still counts them")
            self.metrics = {}

    def update(self, stats: Stats) -> None:
        for key, metric in self.metrics.items():
            try:
                metric.set(float(getattr(stats, key)))
            except Exception:
                return

"""The generation model's request and response tensors, and turning one request into a checked job.

Names are the ones users of TensorRT-LLM's Triton backend (`inflight_batcher_llm`) send and read:

    text_input   BYTES  [1]    prompt text (needs the model's tokenizer)   } exactly one of the two
    input_ids    INT64  [-1]   prompt token ids                            }
    max_tokens   INT32  [1]    new tokens to generate (required)
    temperature  FP32   [1]    0 (default): greedy
    top_k        INT32  [1]    0 (default): off
    top_p        FP32   [1]    1 (default): off
    seed         INT64  [1]    sampler seed (default 0): same seed, same tokens
    end_id       INT32  [1]    stop token (default: the model's eos ids); -1: never stop early
    stop_ids     INT32  [-1]   more stop tokens
    stream       BOOL   [1]    true: one response per token; false (default): one response at the end

    output_ids   INT64  [-1]   new token ids (one per response when streaming), the stop token included
    text_output  BYTES  [1]    their text (the new piece when streaming); only with a tokenizer

Everything here is plain numpy: the Triton model reads tensors through a getter, so the checks are
unit-tested without a server. Every problem is a `RequestError` whose message names the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deploy.generate.sampling import SamplingConfig
from deploy.generate.tokenizer import Tokenizer
from export.errors import G2trtError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_*
    dims: tuple[int, ...]
    optional: bool = True


INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,)),
    TensorSpec("input_ids", "TYPE_INT64", (-1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=False),
    TensorSpec("temperature", "TYPE_FP32", (1,)),
    TensorSpec("top_k", "TYPE_INT32", (1,)),
    TensorSpec("top_p", "TYPE_FP32", (1,)),
    TensorSpec("seed", "TYPE_INT64", (1,)),
    TensorSpec("end_id", "TYPE_INT32", (1,)),
    TensorSpec("stop_ids", "TYPE_INT32", (-1,)),
    TensorSpec("stream", "TYPE_BOOL", (1,)),
)
OUTPUTS = (
    TensorSpec("output_ids", "TYPE_INT64", (-1,)),
    TensorSpec("text_output", "TYPE_STRING", (1,)),
)
_KINDS = {"TYPE_STRING": "OSU", "TYPE_INT64": "iu", "TYPE_INT32": "iu", "TYPE_FP32": "f", "TYPE_BOOL": "b"}
_SPECS = {s.name: s for s in INPUTS}


class RequestError(G2trtError, ValueError):
    """A request the model cannot run; the message names the input and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request may ask of this model: its vocabulary and the cache positions of one slot."""

    vocab_size: int
    max_len: int  # prompt + new tokens, per request
    eos_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]
    stream: bool


Getter = Callable[[str], "np.ndarray | None"]


def parse_request(get: Getter, limits: Limits, tokenizer: Tokenizer | None) -> GenerateRequest:
    """The checked request behind the tensors `get(name)` returns (None: not sent)."""
    prompt = _prompt(get, limits, tokenizer)
    max_tokens = _scalar(get, "max_tokens", None)
    if max_tokens is None:
        raise RequestError("max_tokens is missing: say how many tokens to generate")
    max_tokens = int(max_tokens)
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) + max_tokens > limits.max_len:
        raise RequestError(
            f"max_tokens {max_tokens} with a prompt of {len(prompt)} tokens exceeds the cache: "
            f"{limits.max_len} positions per request"
        )
    temperature = float(_scalar(get, "temperature", 0.0))
    top_k = int(_scalar(get, "top_k", 0))
    top_p = float(_scalar(get, "top_p", 1.0))
    if not temperature >= 0:
        raise RequestError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    seed = int(_scalar(get, "seed", 0))
    if seed < 0:
        raise RequestError(f"seed must be >= 0, got {seed}")
    stream = bool(_scalar(get, "stream", False))
    return GenerateRequest(
        prompt, max_tokens, SamplingConfig(temperature, top_k, top_p, seed), _stop_ids(get, limits), stream
    )


def _prompt(get: Getter, limits: Limits, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    text, ids = _checked(get, "text_input"), _checked(get, "input_ids")
    if text is not None and ids is not None:
        raise RequestError("send text_input or input_ids, not both")
    if text is None and ids is None:
        raise RequestError("the prompt is missing: send text_input (BYTES) or input_ids (INT64)")
    if text is not None:
        if text.size != 1:
            raise RequestError(f"text_input: expected one string, got {text.size}")
        raw = text.reshape(-1)[0]
        try:
            value = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise RequestError("text_input is not UTF-8") from None
        if not value.strip():
            raise RequestError("text_input is empty")
        if tokenizer is None:
            raise RequestError("text_input needs a tokenizer and this model has none: send input_ids")
        prompt = tokenizer.encode(value)
        source = "text_input"
    else:
        assert ids is not None
        prompt = [int(t) for t in ids.reshape(-1)]
        source = "input_ids"
        if not prompt:
            raise RequestError("input_ids is empty")
    bad = next(((i, t) for i, t in enumerate(prompt) if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise RequestError(
            f"{source}: token id {bad[1]} at position {bad[0]} is outside the vocabulary [0, {limits.vocab_size})"
        )
    return tuple(prompt)


def _stop_ids(get: Getter, limits: Limits) -> frozenset[int]:
    end_id = _scalar(get, "end_id", None)
    stops: set[int] = set(limits.eos_ids) if end_id is None else set() if int(end_id) == -1 else {int(end_id)}
    extra = _checked(get, "stop_ids")
    if extra is not None:
        stops |= {int(t) for t in extra.reshape(-1)}
    bad = sorted(t for t in stops if not 0 <= t < limits.vocab_size)
    if bad:
        name = "end_id" if end_id is not None and int(end_id) in bad else "stop_ids"
        raise RequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
    return frozenset(stops)


def _checked(get: Getter, name: str) -> np.ndarray | None:
    """The tensor `name` if sent, after a dtype check (Triton checks too; this keeps the model honest alone)."""
    value = get(name)
    if value is None:
        return None
    value = np.asarray(value)
    spec = _SPECS[name]
    if value.dtype.kind not in _KINDS[spec.data_type]:
        raise RequestError(f"{name}: expected {spec.data_type.removeprefix('TYPE_')}, got {value.dtype}")
    return value


def _scalar(get: Getter, name: str, default: Any) -> Any:
    value = _checked(get, name)
    if value is None:
        return default
    if value.size != 1:
        raise RequestError(f"{name}: expected one value, got {value.size}")
    return value.reshape(-1)[0].item()


def describe(specs: Sequence[TensorSpec]) -> list[str]:
    """One line per tensor (for docs and the package summary)."""
    return [f"{s.name} {s.data_type.removeprefix('TYPE_')} {list(s.dims)}{' (optional)' * s.optional}" for s in specs]

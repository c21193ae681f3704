"""A small HTTP client for a served generation model: Triton's generate extension and its metrics.

Standard library only (urllib), so `g2trt pipeline` queries its server without tritonclient. The
generate extension maps a flat JSON object to the model's tensors (`{"input_ids": [2, 651],
"max_tokens": 8}`); `/generate` wants exactly one response (`stream` false, the default), and
`/generate_stream` returns server-sent events, one per token when `"stream": true`. gRPC streaming
clients use `tritonclient.grpc` directly (tests/deploy/test_serve_server.py shows both).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from export.errors import G2trtError


class RequestFailed(G2trtError, RuntimeError):
    """The server answered with an error (its message is this one's)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise RequestFailed(_error_of(e.read().decode("utf-8", "replace")), e.code) from None


def _error_of(text: str) -> str:
    try:
        return str(json.loads(text).get("error", text))
    except (json.JSONDecodeError, AttributeError):
        return text.strip()


def generate(url: str, model: str, inputs: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST /v2/models/MODEL/generate: the one response (output_ids, text_output) as a dict."""
    with _post(f"{url}/v2/models/{model}/generate", inputs, timeout) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def generate_stream(url: str, model: str, inputs: dict[str, Any], timeout: float = 60) -> Iterator[dict[str, Any]]:
    """POST /v2/models/MODEL/generate_stream: each server-sent event as a dict; an error event raises."""
    with _post(f"{url}/v2/models/{model}/generate_stream", inputs, timeout) as r:
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:") :])
            if "error" in event:
                raise RequestFailed(str(event["error"]))
            yield event


def stream_ids(url: str, model: str, inputs: dict[str, Any], timeout: float = 60) -> tuple[list[int], str]:
    """Streamed token ids and the text pieces joined (empty without a tokenizer)."""
    ids: list[int] = []
    text = ""
    for event in generate_stream(url, model, {**inputs, "stream": True}, timeout):
        value = event["output_ids"]
        ids.extend(value if isinstance(value, list) else [value])
        text += event.get("text_output", "")
    return ids, text


def metrics(metrics_url: str, prefix: str = "g2trt_", timeout: float = 10) -> dict[str, dict[str, float]]:
    """Prometheus gauges named `prefix`*, as {metric: {model: value}}."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(rf'^({re.escape(prefix)}\w+)\{{model="([^"]+)"\}} (\S+)$', text, re.M):
        out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out

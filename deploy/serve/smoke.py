"""Package, serve, query, stop: the closing stage of `g2trt pipeline`, as one library call.

The served tokens are checked against `g2trt generate`'s on the same model (greedy, in this process),
and the stop against what it must leave behind: no server or stub process, no shared-memory region.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from deploy.serve.client import stream_ids
from deploy.serve.generate_model import generate_name, package_repository
from deploy.serve.runtime import ServingParams
from deploy.serve.server import ServerOptions, TritonServer, group_alive, leftover_regions, unavailable_reason
from export.errors import G2trtError


@dataclasses.dataclass
class SmokeResult:
    status: str  # "ok", "skipped" or "FAIL"
    text: str
    details: dict[str, object] = dataclasses.field(default_factory=dict)


def package_serve_query(
    model: str | Path, repo: str | Path, *, tokenizer: str | Path | None = None, new_tokens: int = 16, seed: int = 0
) -> SmokeResult:
    reason = unavailable_reason()
    if reason is not None:
        return SmokeResult("skipped", reason)
    from deploy.generate.loop import GenerationConfig, generate
    from deploy.runners.factory import open_runner, resolve_model

    _, generation = package_repository(model, repo, tokenizer=tokenizer, params=ServingParams(slots=2))
    assert generation is not None
    ref = resolve_model(model)
    cfg = ref.config
    prompt = [cfg.bos_token_id, *np.random.default_rng(seed).integers(3, cfg.vocab_size, 11).tolist()]
    expected = generate(open_runner(ref, "ort"), [prompt], GenerationConfig(max_new_tokens=new_tokens, stop_tokens=()))
    server = TritonServer(repo, ServerOptions(http_port=0, grpc_port=0, metrics_port=0))
    server.start()
    try:
        start = time.perf_counter()
        inputs = {"input_ids": prompt, "max_tokens": new_tokens, "end_id": -1}
        got, _ = stream_ids(server.url, generate_name("gemma2"), inputs)
        query_s = time.perf_counter() - start
    except G2trtError as e:
        return SmokeResult("FAIL", f"query failed: {e}")
    finally:
        server.stop()
    assert server.proc is not None
    left = [*(["processes"] if group_alive(server.proc.pid) else []), *map(str, leftover_regions(server.shm_prefix))]
    details: dict[str, object] = {
        "ready_s": server.ready_seconds,
        "query_s": query_s,
        "tokens": got,
        "expected": expected.tokens[0],
        "repository": str(repo),
    }
    if got != expected.tokens[0]:
        differ = f"served tokens {got[:8]}... differ from g2trt generate's {expected.tokens[0][:8]}..."
        return SmokeResult("FAIL", differ, details)
    if left:
        return SmokeResult("FAIL", f"left behind after the stop: {', '.join(left)}", details)
    text = (
        f"ready in {server.ready_seconds:.1f} s; {len(got)} tokens streamed over HTTP in {query_s * 1e3:.0f} ms "
        "= g2trt generate's; stopped cleanly"
    )
    return SmokeResult("ok", text, details)

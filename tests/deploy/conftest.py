"""Fixtures of the runtime tests (generation, benchmarks, packaging).

The generation tests use an *untied* tiny model (own lm_head): with tied embeddings a random Gemma 2
mostly repeats its last token, so "greedy tokens are identical" would hold for broken caches too. With
an own lm_head (seed 1) greedy output varies from token to token, which the tests assert first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export.config import Gemma2Config, preset
from export.onnx_export import ExportOptions, ExportResult, export_onnx
from export.weights import RandomWeights

RUNTIME_SEED = 1


@pytest.fixture(scope="session")
def runtime_cfg() -> Gemma2Config:
    return preset("tiny").replace(tie_word_embeddings=False)


@pytest.fixture(scope="session")
def runtime_weights(runtime_cfg: Gemma2Config) -> RandomWeights:
    return RandomWeights(runtime_cfg, seed=RUNTIME_SEED)


@pytest.fixture(scope="session")
def runtime_export(tmp_path_factory: pytest.TempPathFactory, runtime_weights: RandomWeights) -> ExportResult:
    """fp32 export of the untied tiny model (the plain graph every target starts from)."""
    return export_onnx(runtime_weights, tmp_path_factory.mktemp("runtime-onnx"), ExportOptions(dtype="fp32"))


@pytest.fixture(scope="session")
def runtime_inplace_export(tmp_path_factory: pytest.TempPathFactory, runtime_weights: RandomWeights) -> ExportResult:
    """The same model exported with the in-place KV cache contract."""
    options = ExportOptions(dtype="fp32", kv_cache="inplace")
    return export_onnx(runtime_weights, tmp_path_factory.mktemp("runtime-inplace-onnx"), options)


@pytest.fixture(scope="session")
def runtime_target(tmp_path_factory: pytest.TempPathFactory, runtime_export: ExportResult):
    """`runtime_target("ort" | "trt")` -> model.onnx of the graph-pass output for that target (cached)."""
    cache: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in cache:
            from graph_passes import optimize

            result = optimize(runtime_export.model_path, target, tmp_path_factory.mktemp(f"runtime-{target}"))
            cache[target] = Path(getattr(result, "model_path", result))
        return cache[target]

    return get

"""The pass order of each target is the explicit list in graph_passes/targets.py, and every pass has
its own module (pattern drawn in its docstring) and its own test file."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from graph_passes import PASSES, TARGETS, OptimizeError
from graph_passes.targets import passes_for

FUSIONS = ["fuse_rmsnorm", "fuse_sandwich_norm", "insert_sliding_window_attention"]


def test_the_order_of_every_target() -> None:
    names = {t: [p.name for p in passes] for t, passes in TARGETS.items()}
    assert names == {
        "trt": [*FUSIONS, "insert_softcap", "expand_rmsnorm"],
        "ort": [
            *FUSIONS,
            "fuse_gelu_ort",
            "fuse_parallel_matmuls",
            "lower_sandwich_ort",
            "lower_rmsnorm_ort",
            "lower_attention_ort",
            "lower_tied_head_ort",
        ],
        "trt-native": [
            *FUSIONS,
            "insert_softcap",
            "expand_sandwich_norm",
            "expand_rmsnorm",
            "expand_softcap",
            "expand_attention",
        ],
    }


@pytest.mark.parametrize("target", list(TARGETS))
def test_order_constraints(target: str) -> None:
    names = [p.name for p in TARGETS[target]]
    assert names.index("fuse_rmsnorm") < names.index("fuse_sandwich_norm")  # sandwiches pair RMSNorm nodes
    if "insert_softcap" in names:  # attention absorbs its own soft-caps first
        assert names.index("insert_sliding_window_attention") < names.index("insert_softcap")
    last_fusion = max(i for i, n in enumerate(names) if n.startswith(("fuse_", "insert_")))
    assert all(i > last_fusion for i, n in enumerate(names) if n.startswith(("lower_", "expand_")))


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_has_its_module_pattern_and_test(name: str) -> None:
    module = importlib.import_module(f"graph_passes.{name}")
    assert module.PASS is PASSES[name] and module.PASS.name == name
    assert "─>" in (module.__doc__ or "") or "->" in (module.__doc__ or "")  # the pattern, drawn
    assert (Path(__file__).parent / f"test_{name}.py").is_file(), f"no tests/graph_passes/test_{name}.py"


def test_unknown_target_is_a_one_line_error() -> None:
    with pytest.raises(OptimizeError, match="unknown target 'tensorrt'; choose from trt, ort, trt-native"):
        passes_for("tensorrt")


def test_the_ort_target_has_a_form_per_execution_provider() -> None:
    cpu, cuda = passes_for("ort", "cpu"), passes_for("ort", "cuda")
    assert cpu == TARGETS["ort"]
    assert [p.name for p in cuda] == [
        "lower_attention_ort_cuda" if p.name == "lower_attention_ort" else p.name for p in cpu
    ]
    with pytest.raises(OptimizeError, match="unknown provider 'rocm'; choose from cpu, cuda"):
        passes_for("ort", "rocm")
    with pytest.raises(OptimizeError, match="--provider cuda applies to the ort target only"):
        passes_for("trt", "cuda")

"""`g2trt verify` / `pipeline` cross the sliding window of a real checkpoint (4096 tokens), and say so.

The "longer than the window" prompt was once capped at 512 tokens, so a real checkpoint was never verified
across its window while the README said every graph was. It is now window + 9 tokens unless a cap is given,
and a cap that keeps it inside the window is reported as such.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.pipeline import PipelineOptions
from deploy.verify.model import verify_model
from deploy.verify.parity import TOLERANCE, Report, StepDiff, parity_cases
from export.checkpoint import open_checkpoint
from export.config import preset
from export.onnx_export import ExportOptions, export_onnx
from tests.conftest import save_checkpoint


@pytest.mark.parametrize("name", ["2b", "9b", "27b"])
def test_the_long_case_crosses_a_real_window_unless_capped(name: str) -> None:
    cfg = preset(name)
    assert [c.input_ids.shape[1] for c in parity_cases(cfg)] == [11, cfg.sliding_window + 9] == [11, 4105]
    assert parity_cases(cfg, max_len=512)[1].input_ids.shape[1] == 512  # only when asked
    assert PipelineOptions().verify_max_len is None  # the pipeline asks for no cap


@pytest.fixture(scope="module")
def window_4096(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its fp32 export) of a 2-layer tiny-width model with Gemma 2's real 4096-token window."""
    cfg = preset("tiny").replace(num_hidden_layers=2, sliding_window=4096, max_position_embeddings=8192)
    root = tmp_path_factory.mktemp("window-4096")
    checkpoint = save_checkpoint(cfg, root / "checkpoint")
    return checkpoint, export_onnx(open_checkpoint(checkpoint), root / "onnx", ExportOptions()).model_path


def test_verify_with_a_checkpoint_crosses_its_4096_token_window(window_4096) -> None:
    checkpoint, model = window_4096
    res = CliRunner().invoke(cli, ["verify", str(model), "--checkpoint", str(checkpoint)])
    assert res.exit_code == 0, res.output
    assert "prompts up to 4105 tokens, across the 4096-token window" in " ".join(res.output.split())
    capped = verify_model(model, checkpoint, max_len=64)
    assert capped.ok and not capped.crosses_window
    assert capped.coverage() == "NOT across the 4096-token window (prompts capped at 64 tokens)"


def test_half_precision_bounds_are_relative_to_the_logits() -> None:
    report = Report("a", "b", [StepDiff("c", "prefill", 0.3, 24.0), StepDiff("c", "decode 1", 0.01, 0.5)])
    assert report.relative == pytest.approx(0.02) and report.worst == 0.3
    assert TOLERANCE["fp16"].relative and TOLERANCE["fp16"].measure(report) == report.relative
    assert not TOLERANCE["fp32"].relative and TOLERANCE["fp32"].measure(report) == 0.3
    assert str(TOLERANCE["fp16"]) == "0.015 x max|logit|"

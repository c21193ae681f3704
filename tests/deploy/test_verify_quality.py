"""Teacher-forced quality (deploy/verify/quality.py) and `g2trt verify` on quantized graphs.

The metrics on hand-made logits; one prefill and token-by-token stepping give the same per-position logits
(fp32 export, <= 1e-4); a quantized graph is judged by top-1 agreement (AGREEMENT_BOUND), not by 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.model import verify_model
from deploy.verify.quality import AGREEMENT_BOUND, compare_logits, quality_ids, teacher_forced
from export.weights import RandomWeights, load_model


def test_metrics_on_hand_made_logits() -> None:
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    same = compare_logits(ref, ref + 5.0)  # a constant shift changes no probability
    assert same.top1_agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert same.max_abs_diff == same.mean_abs_diff == 5.0
    flipped = compare_logits(ref, np.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert flipped.top1_agreement == 0.5
    p = np.exp([0.0, 1.0, 0.0]) / np.exp([0.0, 1.0, 0.0]).sum()
    q = np.exp([1.0, 0.0, 0.0]) / np.exp([1.0, 0.0, 0.0]).sum()
    assert flipped.mean_kl == pytest.approx(float((p * np.log(p / q)).sum()) / 2)
    assert compare_logits(ref, ref * np.nan).mean_kl == float("inf")


def test_stepwise_equals_one_prefill(tiny_export, tiny_cfg) -> None:
    reference = TorchRunner(load_model(RandomWeights(tiny_cfg)))
    ids = quality_ids(tiny_cfg, 40)
    full = teacher_forced(reference, OrtRunner(tiny_export("fp32").model_path, tiny_cfg), ids, stepwise=False)
    last = tiny_export("fp32", last_logits_only=True).model_path
    reference_last = TorchRunner(load_model(RandomWeights(tiny_cfg), last_logits_only=True))
    stepped = teacher_forced(reference_last, OrtRunner(last, tiny_cfg), ids, stepwise=True)
    for q in (full, stepped):
        assert q.tokens == 40 and q.top1_agreement == 1.0 and q.max_abs_diff <= 1e-4 and q.mean_kl < 1e-9


def test_verify_judges_a_quantized_graph_by_agreement(tiny_export) -> None:
    v = verify_model(tiny_export("fp32", quant="int8").model_path, max_len=24, quality_tokens=128)
    assert v.scheme == "int8" and v.quality is not None and v.quality.tokens == 128
    assert v.agreement_bound == AGREEMENT_BOUND["int8"] and v.ok
    assert v.report.worst > 1e-3  # a quantized graph is nowhere near the float bound; reported, not bounded
    assert 0 < v.quality.mean_kl < 1e-2 and v.quality.mean_abs_diff < v.quality.max_abs_diff


def test_cli_verify_prints_agreement_and_kl(tiny_export) -> None:
    result = CliRunner().invoke(cli, ["verify", str(tiny_export("fp32", quant="int4").model_path), "--tokens", "64"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "mean KL" in result.output
    assert "teacher-forced over 64 tokens" in result.output and "ok: top-1 agreement" in result.output

"""expand_attention: SlidingWindowAttention -> standard ops (GQA by reshaping queries, no KV Expand),
equal to the reference for every step kind lower_attention_ort is checked on."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes import expand_attention, insert_sliding_window_attention
from tests.graph_passes.graphs import F16, F32, FP32_BOUND, apply, max_output_diff, ops, prefill_feeds, run
from tests.graph_passes.test_lower_attention_ort import STEPS, _feeds, _swa_model
from trt_plugins.attention import SPEC


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize(("window", "cap"), [(0, 0.0), (4, 5.0)])
@pytest.mark.parametrize("elem", [F32, F16])
def test_expanded_attention_equals_the_reference(step: str, window: int, cap: float, elem: int) -> None:
    m = _swa_model(window, cap, elem)
    expanded, (report,) = apply(m, expand_attention.PASS)
    assert report.count == 1 and SPEC.name not in ops(expanded) and "Expand" not in ops(expanded)
    seq, past, extra = STEPS[step]
    feeds = _feeds(seq, past, extra, np.float16 if elem == F16 else np.float32)
    got, want = run(expanded, feeds), run(m, feeds)
    valid = feeds["attention_mask"][:, -seq:].astype(bool)
    tol = 1e-2 if elem == F16 else 1e-5
    out_got, out_want = (o.transpose(0, 2, 1, 3)[valid].astype(np.float32) for o in (got[0], want[0]))
    np.testing.assert_allclose(out_got, out_want, atol=tol, rtol=tol)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_export_round_trip(tiny_proto, tiny_export, tiny_cfg) -> None:
    expanded, (_, report) = apply(
        tiny_proto, insert_sliding_window_attention.PASS, expand_attention.PASS, config=tiny_cfg
    )
    kinds = ops(expanded)
    assert report.count == 4 and kinds.count("Softmax") == 4 and kinds.count("Expand") == 0
    assert kinds.count("Where") == 2  # one mask per layer type, as the export builds them
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, expanded, weights, prefill_feeds(tiny_cfg)) <= FP32_BOUND

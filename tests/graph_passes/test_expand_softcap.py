"""expand_softcap: SoftCap -> Div/Tanh/Mul in fp32, cast back for fp16 inputs."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes import expand_softcap, insert_softcap
from tests.graph_passes.graphs import F16, F32, apply, max_output_diff, node_model, ops, prefill_feeds, run
from trt_plugins.softcap import SPEC


def _cap(elem: int, domain: str = SPEC.domain):
    return node_model(SPEC.name, domain, [("x", elem, [2, 5])], [("logits", elem, [2, 5])], **SPEC.attributes(cap=30.0))


@pytest.mark.parametrize("elem", [F32, F16])
def test_expanded_softcap_equals_its_reference(elem: int) -> None:
    m = _cap(elem)
    expanded, (report,) = apply(m, expand_softcap.PASS)
    assert report.sites == ["logits"] and "Tanh" in ops(expanded)
    x = (np.random.default_rng(0).standard_normal((2, 5)) * 60).astype(np.float16 if elem == F16 else np.float32)
    got, want = run(expanded, {"x": x})[0], run(m, {"x": x})[0]
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-6, atol=1e-5)


def test_other_domains_are_left_alone() -> None:
    out, (report,) = apply(_cap(F32, "custom"), expand_softcap.PASS)
    assert report.count == 0 and ops(out) == [SPEC.name]


def test_tiny_export_round_trip(tiny_proto, tiny_export, tiny_cfg) -> None:
    expanded, (_, report) = apply(tiny_proto, insert_softcap.PASS, expand_softcap.PASS, config=tiny_cfg)
    assert report.count == 5 and sorted(ops(expanded)) == sorted(ops(tiny_proto))
    weights = tiny_export("fp32").model_path.parent
    assert max_output_diff(tiny_proto, expanded, weights, prefill_feeds(tiny_cfg)) == 0.0

"""Pass reports on weightless graphs: the tiny skeleton is the tiny export's graph, and a 2B-shaped
graph (26 layers) gets every site the config implies on every target."""

from __future__ import annotations

import pytest

from export.config import preset
from graph_passes.skeleton import graph_only, markdown, reports


def test_skeleton_is_the_exported_graph(tiny_proto, tiny_cfg) -> None:
    skeleton = graph_only(tiny_cfg)
    assert [n.op_type for n in skeleton.graph.node] == [n.op_type for n in tiny_proto.graph.node]
    assert {i.name for i in skeleton.graph.initializer} == {i.name for i in tiny_proto.graph.initializer}


@pytest.mark.slow
def test_2b_shaped_graph_every_site_on_every_target() -> None:
    cfg = preset("2b")
    results = reports(cfg)  # raises SiteCountError on any missing site
    for target, (before, after, passes) in results.items():
        counts = {p.name: p.count for p in passes}
        assert counts["fuse_rmsnorm"] == 4 * 26 + 1
        assert counts["fuse_sandwich_norm"] == 2 * 26
        assert counts["insert_sliding_window_attention"] == 26
        assert counts.get("insert_softcap", 1) == 1
        assert after < before, target
    assert "| ort | **total** |" in markdown("2b", cfg, results)


def test_quantized_skeleton_keeps_the_site_counts(tiny_cfg) -> None:
    from export.onnx_export import ExportOptions
    from graph_passes.targets import SKIPPED_WHEN_QUANTIZED

    skipped = {p.name for group in SKIPPED_WHEN_QUANTIZED.values() for p in group}
    quantized = reports(tiny_cfg, ExportOptions(quant="int4"))
    for target, (_, _, passes) in reports(tiny_cfg).items():
        want = {p.name: p.count for p in passes if p.name not in skipped}
        assert {p.name: p.count for p in quantized[target][2]} == want, target
    assert "| ort | **total** |" in markdown("tiny int4", tiny_cfg, quantized)

"""decode_graph: the in-place `ort` graph's one-token form keeps every attention's GroupQueryAttention and
nothing else of its If (conditions, prompt branches, their constants); graphs it does not apply to (the
plain export; the dynamic contract's `ort` graph, whose If runs GroupQueryAttention in its else branch)
stay as they are.
Its numbers against the If graph: tests/deploy/test_inplace.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from graph_passes import optimize
from graph_passes.decode_graph import decode_graph


@pytest.fixture(scope="module")
def inplace_export(tiny_export):
    return tiny_export(kv_cache="inplace")


def _ort(export, tmp_path: Path, provider: str) -> onnx.ModelProto:
    return onnx.load(optimize(export.model_path, "ort", tmp_path / provider, provider=provider).model_path)


def test_one_token_form_of_the_ort_graph(inplace_export, tiny_cfg, tmp_path: Path) -> None:
    model = _ort(inplace_export, tmp_path, "cpu")
    assert decode_graph(model) == tiny_cfg.num_hidden_layers
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["If"] == 0 and ops["GroupQueryAttention"] == tiny_cfg.num_hidden_layers
    assert not {"TensorScatter", "RotaryEmbedding", "Softmax", "Greater", "Equal", "And"} & set(ops)
    produced = {o for n in model.graph.node for o in n.output}
    reads = {i for n in model.graph.node for i in n.input if i}
    known = produced | {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    assert reads <= known  # nothing read that only a removed branch produced
    assert {i.name for i in model.graph.initializer} <= reads  # no constant left unread


@pytest.mark.parametrize("which", ["plain", "ort, dynamic contract"])
def test_graphs_it_does_not_apply_to_are_unchanged(which, inplace_export, tiny_export, tmp_path: Path) -> None:
    model = onnx.load(inplace_export.model_path) if which == "plain" else _ort(tiny_export(), tmp_path, "cpu")
    before = model.SerializeToString()
    assert decode_graph(model) == 0
    assert model.SerializeToString() == before

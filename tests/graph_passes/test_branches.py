"""branches.move_into_branches: each If branch takes the nodes only it needs; a node both branches (or
two Ifs) read stays in the main graph; the result runs in onnxruntime and computes the same numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_passes import branches
from graph_passes.graph import PassGraph
from tests.graph_passes.graphs import run, top_ops, vi


def _graph() -> tuple[PassGraph, list[gs.Node]]:
    """x ─ Abs ─> shared;  then: Relu(shared) + 1;  else: Neg(shared) * 2;  for two Ifs on cond."""
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [vi("x", shape=[3]), vi("cond", onnx.TensorProto.BOOL, [])], []),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    g = PassGraph.from_proto(proto)
    x, cond = g.graph.inputs
    shared = g.op("Abs", [x], dtype=np.float32)
    ifs = []
    for i in range(2):
        then_out = g.op("Add", [g.op("Relu", [shared], dtype=np.float32), g.constant("one", np.float32(1))])
        else_out = g.op("Mul", [g.op("Neg", [shared], dtype=np.float32), g.constant("two", np.float32(2))])
        for t in (then_out, else_out):
            t.dtype, t.shape = np.float32, [3]
        out = g.variable(f"y{i}", np.float32, [3])
        ifs.append(branches.make_if(g, cond, [then_out], [else_out], [out]))
        g.graph.outputs.append(out)
    return g, ifs


def test_each_branch_takes_what_only_it_uses() -> None:
    g, ifs = _graph()
    branches.move_into_branches(g, ifs)
    assert sorted(n.op for n in g.nodes) == ["Abs", "If", "If"]  # Abs feeds all four branches
    for node in ifs:
        assert [n.op for n in node.attrs["then_branch"].nodes] == ["Relu", "Add"]
        assert [n.op for n in node.attrs["else_branch"].nodes] == ["Neg", "Mul"]
    g.changed = True
    proto = g.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert top_ops(proto) == ["Abs", "If", "If"]
    x = np.array([-1.5, 0.0, 2.0], np.float32)
    for cond, want in ((True, np.abs(x) + 1), (False, -np.abs(x) * 2)):
        for got in run(proto, {"x": x, "cond": np.array(cond)}):
            np.testing.assert_array_equal(got, want)

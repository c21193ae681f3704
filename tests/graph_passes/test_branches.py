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


def test_nested_ifs_move_inner_first_then_with_what_their_branches_share() -> None:
    """outer(c1): then Relu(shared) ; else inner(c2): then Exp(s2), else Log(s2), s2 = Sigmoid(shared).

    s2 feeds both inner branches, and only the outer else: it must end up in the outer else, next to the
    inner If; Exp and Log in the inner branches; Abs (shared by everything) in the main graph."""
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [],
            "g",
            [vi("x", shape=[3]), vi("c1", onnx.TensorProto.BOOL, []), vi("c2", onnx.TensorProto.BOOL, [])],
            [],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    g = PassGraph.from_proto(proto)
    x, c1, c2 = g.graph.inputs
    shared = g.op("Abs", [x], dtype=np.float32, shape=[3])
    s2 = g.op("Sigmoid", [shared], dtype=np.float32, shape=[3])
    inner_then = g.op("Exp", [s2], dtype=np.float32, shape=[3])
    inner_else = g.op("Log", [s2], dtype=np.float32, shape=[3])
    inner_out = g.variable("inner", np.float32, [3])
    inner = branches.make_if(g, c2, [inner_then], [inner_else], [inner_out])
    outer_then = g.op("Relu", [shared], dtype=np.float32, shape=[3])
    out = g.variable("y", np.float32, [3])
    outer = branches.make_if(g, c1, [outer_then], [inner_out], [out])
    g.graph.outputs.append(out)
    branches.move_into_branches(g, [inner])
    branches.move_into_branches(g, [outer])
    assert sorted(n.op for n in g.nodes) == ["Abs", "If"]
    assert [n.op for n in outer.attrs["then_branch"].nodes] == ["Relu"]
    assert sorted(n.op for n in outer.attrs["else_branch"].nodes) == ["If", "Sigmoid"]
    assert [n.op for n in inner.attrs["then_branch"].nodes] == ["Exp"]
    assert [n.op for n in inner.attrs["else_branch"].nodes] == ["Log"]
    g.changed = True
    model = g.to_proto()
    onnx.checker.check_model(model, full_check=True)
    v = np.array([-1.5, 0.5, 2.0], np.float32)
    sig = 1 / (1 + np.exp(-np.abs(v)))
    for a, b, want in ((True, True, np.abs(v)), (False, True, np.exp(sig)), (False, False, np.log(sig))):
        (got,) = run(model, {"x": v, "c1": np.array(a), "c2": np.array(b)})
        np.testing.assert_allclose(got, want, rtol=1e-6)

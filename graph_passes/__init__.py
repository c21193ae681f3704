"""Graph passes: rewrite an exported Gemma 2 graph into what each runtime runs fastest.

    from graph_passes import optimize
    report = optimize("runs/tiny/onnx/model.onnx", "ort", "runs/tiny/ort")

Targets and their pass order: graph_passes/targets.py. One pass per module, its pattern drawn in
its docstring; every pass returns a `PassReport` (sites matched by layer, nodes before/after).
"""

from graph_passes.errors import OptimizeError, SiteCountError
from graph_passes.optimize import optimize, optimize_proto
from graph_passes.report import OptimizeReport, PassReport
from graph_passes.targets import PASSES, TARGETS

__all__ = [
    "PASSES",
    "TARGETS",
    "OptimizeError",
    "OptimizeReport",
    "PassReport",
    "SiteCountError",
    "optimize",
    "optimize_proto",
]

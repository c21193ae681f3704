"""Pass reports for any config without its weights: the exported graph of a preset, weights left as
external references that are never read, run through every target's passes.

    python -m graph_passes.skeleton --preset 2b            # the table for docs/graph_passes.md

Site counts and node counts depend on the graph, not on weight values, so a 27B config is checked in
the time it takes to trace it (about a minute), with no 100 GB export.
"""

from __future__ import annotations

import argparse
import math

import onnx
import onnx_ir as ir

from export.config import Gemma2Config, preset
from export.onnx_export import DATA_FILE, ExportOptions, trace_graph
from export.quantize import QuantSpec, quantize_graph
from graph_passes.graph import all_nodes
from graph_passes.optimize import optimize_proto
from graph_passes.report import PassReport
from graph_passes.targets import TARGETS, passes_for


def graph_only(cfg: Gemma2Config, options: ExportOptions = ExportOptions()) -> onnx.ModelProto:
    """The export's graph (quantized as `options` says); each weight an external reference into a data file
    that does not exist."""
    model = trace_graph(cfg, options)
    if options.quant:
        quantize_graph(model.graph, cfg, QuantSpec(options.quant, options.quant_block, options.quant_head))
    offset = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None and not isinstance(value.const_value, ir.LazyTensor):
            continue
        assert value.dtype is not None and value.shape is not None and value.name is not None
        length = int(math.prod(value.shape.numpy()) * value.dtype.itemsize)
        value.const_value = ir.ExternalTensor(
            DATA_FILE, offset, length, value.dtype, shape=value.shape, name=value.name, base_dir=""
        )
        offset += length
    return ir.serde.serialize_model(model)


def reports(
    cfg: Gemma2Config, options: ExportOptions = ExportOptions()
) -> dict[str, tuple[int, int, list[PassReport]]]:
    """target -> (nodes before, nodes after, pass reports); raises SiteCountError like `optimize`."""
    proto = graph_only(cfg, options)
    quantization = {"head": options.quant_head} if options.quant else None
    out = {}
    for target in TARGETS:
        optimized, reps = optimize_proto(proto, passes_for(target, quantization=quantization), cfg, target)
        out[target] = (len(all_nodes(proto.graph)), len(all_nodes(optimized.graph)), reps)
    return out


def markdown(name: str, cfg: Gemma2Config, results: dict[str, tuple[int, int, list[PassReport]]]) -> str:
    lines = [
        f"### `{name}`: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads",
        "",
        "| target | pass | sites | expected | nodes |",
        "|---|---|---:|---:|---|",
    ]
    for target, (before, after, reps) in results.items():
        for r in reps:
            exp = "-" if r.expected is None else str(len(r.expected))
            lines.append(f"| {target} | {r.name} | {r.count} | {exp} | {r.nodes_before} → {r.nodes_after} |")
        lines.append(f"| {target} | **total** | | | **{before} → {after}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--quant", choices=["int8", "int4", "fp8"])
    args = ap.parse_args()
    cfg = preset(args.preset)
    print(markdown(args.preset, cfg, reports(cfg, ExportOptions(dtype=args.dtype, quant=args.quant))))


if __name__ == "__main__":
    main()

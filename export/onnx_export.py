"""Export Gemma 2 to one ONNX graph for prefill and decode, streaming weights from their source.

How, and why this way:
1. The model is traced on the *meta* device with `torch.onnx.export(dynamo=True)`: the graph of a
   27B model costs no weight memory. Only one layer per layer kind is traced; export/replicate.py copies
   them for the other layers (the same graph as a full trace, in seconds instead of a minute at 2B).
2. onnxscript's optimizer cleans the graph while the weights are still placeholders, so it cannot
   fold, copy or rename them.
3. Weight-only subgraphs the exporter leaves (`Transpose(W)` of a Linear, `1 + w` of an RMSNorm) are
   folded here, lazily, keeping checkpoint names (`...q_proj.weight.T`, `...input_layernorm.weight.plus_one`).
   A tied `lm_head` keeps its `Transpose(embed_tokens)` node: one copy of the embedding on disk.
4. Each weight is pulled from the source (HF safetensors or the seeded random model) as the external data
   file is written (export/write.py: the next weight is prepared on a second thread while this one is
   written and hashed): peak memory is about the largest tensor, twice.
5. With `quant`, export/quantize.py puts the projections' weights behind DequantizeLinear first; their
   codes are computed from those same lazy weights as they are written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.optimizer
import torch
from torch import nn
from torch.export import Dim

from export import io_contract as io
from export.atomic import atomic_dir
from export.config import GLOBAL, SLIDING, Gemma2Config
from export.errors import G2trtError
from export.gc_pause import gc_paused
from export.kv_cache import onnx_kv_write
from export.manifest import build_manifest, write_manifest
from export.model import Gemma2ForCausalLM, rope_inv_freq
from export.quantize import QuantSpec, Scheme, check_spec, quantize_graph
from export.replicate import prefix_config, replicate
from export.weights import DTYPES, WeightSource, to_numpy
from export.write import save_with_data

DType = Literal["fp32", "fp16", "bf16"]
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_ONNX_DTYPES = {
    torch.float32: ir.DataType.FLOAT,
    torch.float16: ir.DataType.FLOAT16,
    torch.bfloat16: ir.DataType.BFLOAT16,
}


class ExportError(G2trtError, RuntimeError):
    """The exporter produced a graph g2trt cannot stand behind."""


INPLACE_OPSET = 24  # ONNX TensorScatter, the in-place cache write


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    dtype: DType = "fp32"
    opset: int | None = None  # None: 18 for the dynamic contract, 24 (TensorScatter) for the in-place one
    last_logits_only: bool = False  # prefill emits logits [B, 1, V]: generation reads nothing else
    naive_fp16: bool = False  # fp16 residual stream, as HF runs it; only to show why it overflows
    full_trace: bool = False  # trace every layer (slow), not one per layer kind: what export/replicate.py equals
    kv_cache: io.KvCache = "dynamic"  # export.io_contract: "inplace" writes fixed-size buffers in place
    quant: Scheme | None = None  # weight-only int8 / int4 / fp8 of the linear projections (export/quantize.py)
    quant_block: int = 32  # int4 / int8: input rows per scale
    quant_head: bool = True  # quantize the LM head too

    def __post_init__(self) -> None:
        if self.kv_cache not in io.KV_CACHES:
            raise ExportError(f"--kv-cache {self.kv_cache!r}: choose {' or '.join(io.KV_CACHES)}")
        if self.opset is None:
            object.__setattr__(self, "opset", INPLACE_OPSET if self.kv_cache == "inplace" else 18)
        elif self.kv_cache == "inplace" and self.opset < INPLACE_OPSET:
            raise ExportError(
                f"--opset {self.opset}: the in-place KV cache needs opset >= {INPLACE_OPSET} (ONNX TensorScatter)"
            )


@dataclasses.dataclass(frozen=True)
class ExportResult:
    model_path: Path
    manifest_path: Path
    manifest: dict
    seconds: float


class _FlatSignature(nn.Module):
    """Flattens the past into positional tensors so every input gets its contract name."""

    def __init__(self, model: Gemma2ForCausalLM) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):  # type: ignore[no-untyped-def]
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.m(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


class _FlatInplaceSignature(_FlatSignature):
    """The in-place contract's signature: no attention_mask, cache buffers in place of the past."""

    def forward(self, input_ids, position_ids, *cache_flat):  # type: ignore[no-untyped-def]
        cache = [(cache_flat[2 * i], cache_flat[2 * i + 1]) for i in range(len(cache_flat) // 2)]
        logits, presents = self.m.forward_inplace(input_ids, position_ids, cache)
        return (logits, *[t for kv in presents for t in kv])


def trace_graph(cfg: Gemma2Config, options: ExportOptions) -> ir.Model:
    """The optimized ONNX graph of `cfg`, its weight initializers left as placeholders (no data).

    Traces one layer per layer kind and copies them for the rest (export/replicate.py: the same graph as a
    trace of every layer, in a fraction of the time), unless `options.full_trace`.
    """
    if options.full_trace:
        return _trace(cfg, options)
    return replicate(_trace(prefix_config(cfg), options), cfg)


def _trace(cfg: Gemma2Config, options: ExportOptions) -> ir.Model:
    # The trace keeps most of what it allocates (FX nodes, sympy expressions, fake tensors) until it
    # returns: collections inside are wasted (~1 s of tiny's 8). Unless `full_trace`, it is of a 2-layer
    # prefix whatever the model's size (export/replicate.py), so the garbage it leaves is bounded.
    with gc_paused():
        return _trace_program(cfg, options)


def _trace_program(cfg: Gemma2Config, options: ExportOptions) -> ir.Model:
    dtype = DTYPES[options.dtype]
    residual = torch.float16 if options.naive_fp16 else None
    inplace = options.kv_cache == "inplace"
    with torch.device("meta"):
        model = Gemma2ForCausalLM(cfg, options.last_logits_only, residual).cast(dtype).eval()
        b, s = 2, 3  # distinct sizes so no dimension is specialized
        lengths = {SLIDING: 7, GLOBAL: 11} if inplace else {SLIDING: 5, GLOBAL: 5}
        ids = torch.zeros(b, s, dtype=torch.int64)
        cache = [
            torch.zeros(b, cfg.num_key_value_heads, lengths[kind], cfg.head_dim, dtype=dtype)
            for kind in cfg.layer_types
            for _ in range(2)
        ]
    batch, seq = Dim(io.BATCH), Dim(io.SEQ)
    if inplace:
        cache_dims = {SLIDING: Dim(io.SLIDING_CACHE), GLOBAL: Dim(io.CACHE)}
        module: nn.Module = _FlatInplaceSignature(model)
        args: tuple[torch.Tensor, ...] = (ids, ids.clone(), *cache)  # distinct tensors: export would alias them
        head: tuple[dict, ...] = ({0: batch, 1: seq}, {0: batch, 1: seq})
    else:
        cache_dims = {SLIDING: Dim(io.SLIDING_PAST), GLOBAL: Dim(io.PAST)}
        module = _FlatSignature(model)
        mask = torch.ones(b, lengths[GLOBAL] + s, dtype=torch.int64, device="meta")
        args = (ids, mask, ids.clone(), *cache)
        head = ({0: batch, 1: seq}, {0: batch, 1: Dim(io.TOTAL)}, {0: batch, 1: seq})
    cache_shapes = tuple({0: batch, 2: cache_dims[kind]} for kind in cfg.layer_types for _ in range(2))
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=False,
            opset_version=options.opset,
            input_names=io.input_names(cfg, options.kv_cache),
            output_names=io.output_names(cfg),
            dynamic_shapes=(*head, cache_shapes),
            custom_translation_table=onnx_kv_write() if inplace else None,
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter with a file target returns None
        raise ExportError("torch.onnx.export returned no program")
    graph_model = program.model
    graph = graph_model.graph
    params = {name for name, _ in model.named_parameters()}
    for value in list(graph.initializers.values()):
        name = _name(value).removeprefix("m.")
        if name != value.name:
            graph.initializers.pop(_name(value))
            value.name = name
            graph.initializers[name] = value
        if name in params:
            value.const_value = None  # a placeholder: the optimizer must not fold or copy weights
        elif name == "inv_freq":
            value.const_value = ir.Tensor(rope_inv_freq(cfg).numpy(), name=name)
        elif value.const_value is not None and _is_meta(value.const_value):
            raise ExportError(f"initializer {name!r} has no value after tracing")
    with _quiet_torch_onnx():  # it logs a line per placeholder weight it (rightly) leaves alone
        onnxscript.optimizer.optimize_ir(graph_model)
    _fold_weight_transforms(graph)
    ir.passes.common.RemoveUnusedNodesPass()(graph_model)  # constants only the folded nodes used
    for node in graph_model.graph.all_nodes():
        # Keep the module scopes (graph passes map nodes to layers by them); drop stack traces and FX dumps,
        # which hold local paths and make up most of model.onnx's size.
        for key in ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"):
            node.metadata_props.pop(key, None)
    for key in ("graph_signature", "range_constraints"):  # FX names of the traced program only
        graph_model.graph.metadata_props.pop(f"pkg.torch.export.ExportedProgram.{key}", None)
    graph_model.producer_name = "g2trt"
    return graph_model


def export_onnx(
    source: WeightSource,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    on_tensor: Callable[[str, int], None] | None = None,
) -> ExportResult:
    """Export `source` (checkpoint or random model) to `out_dir/model.onnx` (+ `.data`, manifest)."""
    start = time.perf_counter()
    cfg = source.config
    spec = QuantSpec(options.quant, options.quant_block, options.quant_head) if options.quant else None
    if spec is not None:
        check_spec(cfg, spec)  # before tracing: bad settings fail in a second
    graph_model = trace_graph(cfg, options)
    _attach_weights(graph_model.graph, source, DTYPES[options.dtype])
    quantization = None
    if spec is not None:  # also raises the opset to 21 (DequantizeLinear's block_size)
        quantization = quantize_graph(graph_model.graph, cfg, spec)
        options = dataclasses.replace(options, opset=graph_model.graph.opset_imports[""])

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        data_sha256 = save_with_data(graph_model, tmp / MODEL_FILE, DATA_FILE, on_tensor)
        hashes = {DATA_FILE: data_sha256}
        extra = {"quantization": quantization} if quantization else {}
        manifest = build_manifest(cfg, tmp / MODEL_FILE, options, "export", hashes, source=source.describe(), **extra)
        write_manifest(tmp, manifest)
    return ExportResult(out_dir / MODEL_FILE, out_dir / "manifest.json", manifest, time.perf_counter() - start)


# --- weight handling ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Transform:
    source: str
    op: Literal["identity", "transpose", "plus_one"]


def _fold_weight_transforms(graph: ir.Graph) -> None:
    """Replace `Transpose(W)` and `Add(w, 1)` of placeholder weights by lazily computed initializers."""
    for node in list(graph):
        inputs = [v for v in node.inputs if v is not None]
        weights = [v for v in inputs if _is_placeholder(graph, v)]
        if len(weights) != 1:
            continue
        w = weights[0]
        op: Literal["transpose", "plus_one"]
        if node.op_type == "Transpose" and len(w.uses()) == 1 and list(node.attributes["perm"].as_ints()) == [1, 0]:
            op, name = "transpose", f"{w.name}.T"
        elif node.op_type == "Add" and _other_is_one(node, w):
            op, name = "plus_one", f"{w.name}.plus_one"
        else:
            continue
        new = ir.Value(name=name, shape=node.outputs[0].shape, type=node.outputs[0].type)
        new.meta["g2trt_transform"] = _Transform(_transform_of(w).source, op)
        graph.initializers[name] = new  # a placeholder too, until `_attach_weights`
        node.outputs[0].replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(_name(w))
    for value in graph.initializers.values():
        if value.const_value is None and "g2trt_transform" not in value.meta:
            value.meta["g2trt_transform"] = _Transform(_name(value), "identity")


def _name(value: ir.Value) -> str:
    assert value.name is not None, "initializers are named"
    return value.name


def _transform_of(value: ir.Value) -> _Transform:
    return value.meta.get("g2trt_transform") or _Transform(_name(value), "identity")


def _is_placeholder(graph: ir.Graph, value: ir.Value) -> bool:
    return value.name in graph.initializers and value.const_value is None


def _other_is_one(node: ir.Node, w: ir.Value) -> bool:
    other = [v for v in node.inputs if v is not w]
    if len(other) != 1 or other[0] is None or other[0].const_value is None:
        return False
    arr = other[0].const_value.numpy()
    return arr.size == 1 and float(arr.reshape(())) == 1.0


def _attach_weights(graph: ir.Graph, source: WeightSource, dtype: torch.dtype) -> None:
    """Point every placeholder initializer at a lazy tensor read from `source` on save."""
    for value in graph.initializers.values():
        if value.const_value is not None:
            continue
        t: _Transform = value.meta["g2trt_transform"]
        onnx_dtype = value.dtype
        assert onnx_dtype is not None and value.shape is not None
        value.const_value = ir.LazyTensor(
            _loader(source, t, onnx_dtype), dtype=onnx_dtype, shape=value.shape, name=value.name
        )


def _loader(source: WeightSource, t: _Transform, dtype: ir.DataType) -> Callable[[], ir.Tensor]:
    torch_dtype = {v: k for k, v in _ONNX_DTYPES.items()}[dtype]

    def load() -> ir.Tensor:
        w = source.get(t.source)
        if t.op == "transpose":
            w = w.t()
        elif t.op == "plus_one":
            w = w.float() + 1.0
        return ir.Tensor(to_numpy(w.to(torch_dtype).contiguous()), dtype=dtype)

    return load


def _is_meta(tensor: ir.TensorProtocol) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


class _quiet_torch_onnx:
    """Silence the exporter's progress prints and its torchvision warnings; we show our own progress."""

    def __enter__(self) -> None:
        names = ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir", "onnxscript")
        self._levels = {n: logging.getLogger(n).level for n in names}
        for n in self._levels:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)

"""Weight-only quantization of an export's linear projections, in the one form both runtimes build.

    W [K, N] float ─────────────────────────────────────────── MatMul(x, ·)
    ─>  Wq [K, N] int4|int8 ─┐
        scale [K/block, N] ──┴ DequantizeLinear(axis=0, block_size) ─ MatMul(x, ·)     (int4, int8)
        Wq [K, N] fp8e4m3 ─┐
        scale [N] ─────────┴ DequantizeLinear(axis=1) ─ MatMul(x, ·)                   (fp8, per output channel)

Why this form: onnxruntime's CPU optimizer fuses the int4/int8 DQ->MatMul into `MatMulNBits` (the
initializer is [K, N], blocks run along K, no zero point), and TensorRT / TensorRT-RTX build it as a
weight-only quantized GEMM that keeps the weights compressed (fp8: per output channel, SM 89+).
Scales are positive (TensorRT requires it) and stored in the export's float dtype.

What is quantized: q/k/v/o/gate/up/down of every layer and, by `QuantSpec.head`, the LM head. A tied head
gets its own quantized [hidden, vocab] copy; the embedding lookup keeps the float table. Norms, the
embedding scale, soft-caps and attention are untouched.

Rounding: symmetric round-to-nearest (RTN), one scale per block of `block_size` input rows, computed in
fp32; codes are rounded against the scale as stored, so the graph dequantizes exactly what was measured.
int8: `amax / 127`, codes in [-127, 127]. int4: codes in [-8, 7], and the scale of each block is chosen
(no calibration data): for each candidate `amax / d`, d in `INT4_DIVISORS`, round, then refit the
scale to those codes by least squares (`Σcw / Σc²`); the candidate whose refit error is least gives
the scale, and the codes are rounded again against it (RTN against a fixed scale minimises each code's
error, so the final error is at most the candidate's). On Gaussian weights this cuts the relative RMS
error from 9.7 % (`amax / 7`) to 8.6 %, where onnxruntime-genai's RTN reaches 8.6 % with negative scales
(the block's extreme always at -8), which TensorRT does not take. fp8: `amax / 448` per output column.

Streaming: every quantized initializer is an `ir.LazyTensor` that reads its float weight through the
export's own lazy loader when `ir.save` writes it; a projection's codes and scales come from one read
(`_Pair`), so peak memory stays about one float weight.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from export.config import Gemma2Config
from export.errors import G2trtError

Scheme = Literal["int8", "int4", "fp8"]
MIN_OPSET = 21  # DequantizeLinear's block_size, int4 weights
FP8_MAX = 448.0  # float8 e4m3fn


class QuantError(G2trtError, ValueError):
    """A quantization setting the model or the runtimes cannot take."""


@dataclasses.dataclass(frozen=True)
class SchemeInfo:
    dtype: ir.DataType
    qmax: float  # largest positive code
    blocked: bool  # blocks along K (int); False: one scale per output column (fp8)
    qmin: float = 0.0  # most negative code (-qmax unless set)
    divisors: tuple[float, ...] = ()  # scale candidates amax / d, chosen per block (module docstring)


# amax / d candidates for int4: 7 keeps every weight in range, 8 puts a negative extreme exactly on -8,
# larger ones clip the extreme for a finer step; the refit moves each to its least-squares scale.
INT4_DIVISORS = (7.0, 7.5, 8.0, 8.5)
SCHEMES: dict[str, SchemeInfo] = {
    "int8": SchemeInfo(ir.DataType.INT8, 127.0, True, -127.0),
    "int4": SchemeInfo(ir.DataType.INT4, 7.0, True, -8.0, INT4_DIVISORS),
    "fp8": SchemeInfo(ir.DataType.FLOAT8E4M3FN, FP8_MAX, False),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJ = re.compile(r"^model\.layers\.(\d+)\.\w+\.(" + "|".join(PROJECTIONS) + r")\.weight\.T$")
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight.T"  # an untied head, pre-transposed by the export


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    scheme: Scheme
    block_size: int = 32  # int4 / int8: rows of W [K, N] per scale; fp8 ignores it (per output channel)
    head: bool = True  # also the LM head (onnxruntime-genai -p int4 does; Model Optimizer does not)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantError(f"--quant {self.scheme}: choose one of {', '.join(SCHEMES)}")
        b = self.block_size
        if self.info.blocked and (b < 16 or b & (b - 1)):
            raise QuantError(f"--quant-block {b}: must be a power of two >= 16 (onnxruntime's MatMulNBits blocks)")

    @property
    def info(self) -> SchemeInfo:
        return SCHEMES[self.scheme]

    def describe(self, scale_dtype: str, projections: int) -> dict[str, Any]:
        """The manifest's `quantization` entry."""
        return {
            "scheme": self.scheme,
            "method": "rtn",
            "scale": "least-squares of the best amax / d" if self.info.divisors else "amax / qmax",
            "symmetric": True,
            "weights": self.info.dtype.name.lower(),
            "axis": 0 if self.info.blocked else 1,
            "block_size": self.block_size if self.info.blocked else None,
            "scale_dtype": scale_dtype,
            "head": self.head,
            "projections": projections,
        }


def input_widths(cfg: Gemma2Config) -> dict[str, int]:
    """K (input width) of every quantized projection, by what sets it."""
    return {
        "hidden_size (q/k/v/gate/up, the head)": cfg.hidden_size,
        "num_attention_heads * head_dim (o_proj)": cfg.num_attention_heads * cfg.head_dim,
        "intermediate_size (down_proj)": cfg.intermediate_size,
    }


def check_spec(cfg: Gemma2Config, spec: QuantSpec) -> None:
    """Refuse, before anything is traced or written, a block size that does not divide an input width."""
    if not spec.info.blocked:
        return
    for what, k in input_widths(cfg).items():
        if k % spec.block_size:
            raise QuantError(f"--quant-block {spec.block_size} does not divide the input width {k} of {what}")


def saved_bytes(cfg: Gemma2Config, spec: QuantSpec, float_bytes: int) -> int:
    """How many fewer bytes the weights file holds than the float export (for progress totals)."""
    k_n = [(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)]  # q
    k_n += [(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim)] * 2  # k, v
    k_n += [(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)]  # o
    k_n += [(cfg.hidden_size, cfg.intermediate_size)] * 2 + [(cfg.intermediate_size, cfg.hidden_size)]
    k_n = k_n * cfg.num_hidden_layers + ([(cfg.hidden_size, cfg.vocab_size)] if spec.head else [])
    bits = 4 if spec.scheme == "int4" else 8
    saved = 0
    for k, n in k_n:
        scales = (k // spec.block_size if spec.info.blocked else 1) * n * float_bytes
        saved += k * n * float_bytes - k * n * bits // 8 - scales
    if spec.head and cfg.tie_word_embeddings:  # a tied head is an extra quantized copy, the table stays
        saved -= cfg.hidden_size * cfg.vocab_size * float_bytes
    return saved


# --- the numbers -------------------------------------------------------------------------------------


def quantize_blocks(w: np.ndarray, spec: QuantSpec, scale_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (codes [K, N] int8 holding int4/int8 values, scales [K/block, N] in `scale_dtype`)."""
    info, b = spec.info, spec.block_size
    k, n = w.shape
    blocks = w.astype(np.float32, copy=False).reshape(k // b, b, n)
    amax = np.abs(blocks).max(axis=1)  # [K/b, N]
    scale = _stored_scale(_least_squares_scale(blocks, amax, info) if info.divisors else amax / info.qmax, scale_dtype)
    codes = _round(blocks, scale.astype(np.float32), info)
    return codes.astype(np.int8).reshape(k, n), scale


def _round(blocks: np.ndarray, scale: np.ndarray, info: SchemeInfo) -> np.ndarray:
    """RTN codes [K/b, b, N] (float32) of `blocks` against `scale` [K/b, N] (in-place ops: np.clip's copying
    form costs several times the rest of the quantization)."""
    codes = blocks / scale[:, None, :]
    np.rint(codes, out=codes)
    return np.clip(codes, info.qmin, info.qmax, out=codes)


def _least_squares_scale(blocks: np.ndarray, amax: np.ndarray, info: SchemeInfo) -> np.ndarray:
    """Per block, the least-squares scale of the codes of the best candidate `amax / d` (module docstring).

    For codes c the best scale is Σcw / Σc² and its squared error Σw² - (Σcw)² / Σc², so the candidate
    with the largest (Σcw)² / Σc² wins; Σw² is the same for all and never computed."""
    best_gain = np.full(amax.shape, -1.0, np.float32)
    best = amax / info.qmax
    for d in info.divisors:
        codes = _round(blocks, np.maximum(amax / d, np.finfo(np.float32).tiny), info)
        cw = np.einsum("kbn,kbn->kn", codes, blocks)
        cc = np.einsum("kbn,kbn->kn", codes, codes)
        nonzero = cc > 0
        gain = np.where(nonzero, cw * cw / np.where(nonzero, cc, 1.0), 0.0)
        better = nonzero & (gain > best_gain)
        best = np.where(better, cw / np.where(nonzero, cc, 1.0), best)
        best_gain = np.where(better, gain, best_gain)
    return best


def quantize_fp8(w: np.ndarray, scale_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (fp8 e4m3fn codes [K, N], scales [N]): one scale per output column."""
    w = w.astype(np.float32, copy=False)
    scale = _stored_scale(np.abs(w).max(axis=0) / FP8_MAX, scale_dtype)
    codes = np.clip(w / scale.astype(np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """What DequantizeLinear computes, in fp32 (for tests and error reports)."""
    c, s = codes.astype(np.float32), scale.astype(np.float32)
    if not spec.info.blocked:
        return c * s
    return c * np.repeat(s, spec.block_size, axis=0)


def quantize(w: np.ndarray, spec: QuantSpec, scale_dtype: Any, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] (any strides: a transposed view is fine) -> (codes as stored, scales), column chunk by column
    chunk, so the temporaries stay about `chunk` elements even for a 256k-vocab head."""
    k, n = w.shape
    store = {"int4": ml_dtypes.int4, "int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}[spec.scheme]
    codes = np.empty((k, n), dtype=store)
    scale = np.empty((k // spec.block_size, n) if spec.info.blocked else (n,), dtype=scale_dtype)
    step = max(1, chunk // k)
    for j in range(0, n, step):
        part = np.ascontiguousarray(w[:, j : j + step])
        c, s = quantize_blocks(part, spec, scale_dtype) if spec.info.blocked else quantize_fp8(part, scale_dtype)
        codes[:, j : j + step] = c.astype(store, copy=False)
        scale[..., j : j + step] = s
    return codes, scale


def _stored_scale(scale: np.ndarray, dtype: Any) -> np.ndarray:
    """The scale as the graph stores it, never zero (an all-zero block gets the smallest normal scale)."""
    return np.maximum(scale, float(ml_dtypes.finfo(dtype).tiny)).astype(dtype)


# --- the graph ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Site:
    matmul: ir.Node
    weight: ir.Value  # the float initializer (or, for a tied head, the embedding behind a Transpose)
    transposed: bool  # the MatMul reads Transpose(weight): the tied head
    name: str  # base name of the new initializers


def quantize_graph(graph: ir.Graph, cfg: Gemma2Config, spec: QuantSpec) -> dict[str, Any]:
    """Replace each projection's float weight by codes -> DequantizeLinear; returns the manifest entry.

    The new initializers read the float weights (export/onnx_export's lazy tensors) only when the model
    is saved; a graph whose weights are placeholders (graph_passes/skeleton.py) is never saved with data."""
    check_spec(cfg, spec)
    if any(node.op_type == "DequantizeLinear" for node in graph):
        raise QuantError("the graph is already quantized (it has DequantizeLinear nodes); quantize the float export")
    sites = _find_sites(graph, spec.head)
    expected = len(PROJECTIONS) * cfg.num_hidden_layers + int(spec.head)
    if len(sites) != expected:
        raise QuantError(
            f"found {len(sites)} of the {expected} projections to quantize; the export's weight names or "
            "MatMul pattern changed (export/quantize.py)"
        )
    order = list(graph.initializers)  # names, as the export declared them (layer by layer)
    new: dict[str, list[ir.Value]] = {}
    for site in sites:
        new.setdefault(_name(site.weight), []).extend(_quantize_site(graph, site, spec))
    _place_initializers(graph, order, new)
    # Opset 21 for DequantizeLinear's block_size and int4. A graph traced at 18 keeps its meaning: of its ops
    # only Cast, Reshape, Shape, (Un)Squeeze and Transpose changed since, by accepting new types (and Cast's
    # `saturate`, which applies to float8 outputs only). Tracing at 21 instead would change the graph itself
    # (a one-node Gelu from opset 20 on), so the passes would meet a different graph than the float export's.
    graph.opset_imports[""] = max(graph.opset_imports.get("", MIN_OPSET), MIN_OPSET)
    names = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
    return spec.describe(names[sites[0].weight.dtype or ir.DataType.FLOAT], len(sites))


def _find_sites(graph: ir.Graph, head: bool) -> list[_Site]:
    sites = []
    for node in graph:
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if _is_initializer(graph, w) and (_PROJ.match(_name(w)) or (head and _name(w) == HEAD)):
            sites.append(_Site(node, w, False, _name(w)))
        elif head and (t := w.producer()) is not None and t.op_type == "Transpose":
            e = t.inputs[0]
            if e is not None and _is_initializer(graph, e) and _name(e) == EMBEDDING:
                sites.append(_Site(node, e, True, f"{EMBEDDING}.T"))
    return sites


def _quantize_site(graph: ir.Graph, site: _Site, spec: QuantSpec) -> tuple[ir.Value, ir.Value]:
    w = site.weight
    assert w.shape is not None and w.dtype is not None
    k, n = (w.shape[1], w.shape[0]) if site.transposed else (w.shape[0], w.shape[1])
    assert isinstance(k, int) and isinstance(n, int)
    scale_shape = [k // spec.block_size, n] if spec.info.blocked else [n]
    pair = _Pair(w, site.transposed, spec, w.dtype)
    codes = _lazy_value(f"{site.name}.{spec.scheme}", spec.info.dtype, [k, n], lambda: pair.take(0))
    scale = _lazy_value(f"{site.name}.scale", w.dtype, scale_shape, lambda: pair.take(1))
    attrs: dict[str, int] = {"axis": 0, "block_size": spec.block_size} if spec.info.blocked else {"axis": 1}
    dq = ir.node("DequantizeLinear", [codes, scale], attributes=attrs, name=f"{site.name}/DequantizeLinear")
    out = dq.outputs[0]
    out.name, out.dtype, out.shape = f"{site.name}.dequantized", w.dtype, ir.Shape([k, n])
    dq.metadata_props.update(site.matmul.metadata_props)  # the layer's scope: graph passes label by it
    graph.insert_before(site.matmul, dq)
    old = site.matmul.inputs[1]
    site.matmul.replace_input_with(1, out)
    if site.transposed and old is not None and not old.uses():
        transpose = old.producer()
        assert transpose is not None
        graph.remove(transpose, safe=True)
    if not w.uses():
        graph.initializers.pop(_name(w))
    return codes, scale


def _lazy_value(name: str, dtype: ir.DataType, shape: list[int], load: Callable[[], ir.TensorProtocol]) -> ir.Value:
    tensor = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=tensor)


class _Pair:
    """Codes and scales of one weight from one read of it; each half is handed out once, then dropped.

    Locked: export/write.py materializes the next weights on two threads, often the two halves at once."""

    def __init__(self, weight: ir.Value, transposed: bool, spec: QuantSpec, float_type: ir.DataType) -> None:
        self.weight, self.transposed, self.spec, self.float_type = weight, transposed, spec, float_type
        self.parts: list[ir.Tensor | None] | None = None
        self.lock = threading.Lock()

    def take(self, index: int) -> ir.Tensor:
        with self.lock:
            if self.parts is None or self.parts[index] is None:
                self.parts = self._compute()
            part = self.parts[index]
            assert part is not None
            self.parts[index] = None
            return part

    def _compute(self) -> list[ir.Tensor | None]:
        tensor = self.weight.const_value
        assert tensor is not None, f"{self.weight.name} has no data to quantize"
        w = np.asarray(tensor.numpy(), dtype=np.float32)  # no copy when the export is fp32
        codes, scale = quantize(w.T if self.transposed else w, self.spec, self.float_type.numpy())
        return [ir.Tensor(codes, dtype=self.spec.info.dtype), ir.Tensor(scale, dtype=self.float_type)]


def _place_initializers(graph: ir.Graph, order: list[str], new: dict[str, list[ir.Value]]) -> None:
    """Add each projection's codes and scales where its float weight was declared: a layer's weights stay
    together in the data file, and the two halves of a `_Pair` are written back to back."""
    kept = dict(graph.initializers)
    graph.initializers.clear()
    for name in order:
        for value in ([kept[name]] if name in kept else []) + new.get(name, []):
            graph.initializers[_name(value)] = value


def _is_initializer(graph: ir.Graph, value: ir.Value) -> bool:
    return value.name is not None and graph.initializers.get(value.name) is value


def _name(value: ir.Value) -> str:
    assert value.name is not None, "initializers are named"
    return value.name

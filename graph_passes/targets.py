"""The pass order of each target: one list per target, in one place.

Every target runs the same four fusions first, so every target checks the same site counts against
the config (norms 4 per layer + 1, sandwiches 2 per layer, attention 1 per layer, soft-cap 1); then
it lowers the fused nodes to what its runtime runs fastest.
"""

from __future__ import annotations

from typing import Any

from graph_passes import (
    expand_attention,
    expand_rmsnorm,
    expand_sandwich_norm,
    expand_softcap,
    fuse_gelu_ort,
    fuse_parallel_matmuls,
    fuse_rmsnorm,
    fuse_sandwich_norm,
    insert_sliding_window_attention,
    insert_softcap,
    lower_attention_ort,
    lower_rmsnorm_ort,
    lower_sandwich_ort,
    lower_tied_head_ort,
)
from graph_passes.driver import Pass

TARGETS: dict[str, tuple[Pass, ...]] = {
    # TensorRT with the g2trt plugins (trt_plugins/): plugin nodes TensorRT's ONNX parser resolves by name.
    "trt": (
        fuse_rmsnorm.PASS,  # every decomposed norm -> RMSNorm (the sandwich pass matches these)
        fuse_sandwich_norm.PASS,  # post-norm + residual + next pre-norm -> SandwichRMSNorm plugin
        insert_sliding_window_attention.PASS,  # before insert_softcap: it absorbs the attention soft-caps
        insert_softcap.PASS,  # what is left: the final logits -> SoftCap plugin
        expand_rmsnorm.PASS,  # layer 0's input norm, the one no sandwich takes: standard ops
    ),
    # onnxruntime (CPU/CUDA) with its contrib ops.
    "ort": (
        fuse_rmsnorm.PASS,
        fuse_sandwich_norm.PASS,
        insert_sliding_window_attention.PASS,
        # no insert_softcap: onnxruntime has no soft-cap op, the logits keep Div/Tanh/Mul
        fuse_gelu_ort.PASS,  # the MLP's tanh-GELU (8 ops) -> FastGelu; after attention took its Tanh nodes
        fuse_parallel_matmuls.PASS,  # q/k/v and gate/up: one MatMul each, on concatenated weights
        lower_sandwich_ort.PASS,  # -> SimplifiedLayerNormalization + SkipSimplifiedLayerNormalization
        lower_rmsnorm_ort.PASS,  # -> SimplifiedLayerNormalization
        lower_attention_ort.PASS,  # -> RotaryEmbedding + If(prompt: standard ops, one token: GroupQueryAttention)
        lower_tied_head_ort.PASS,  # tied head: Gemm(transB) on the embedding, no transposed copy
    ),
    # Stock TensorRT / TensorRT-RTX, no plugins: the fused nodes expanded to the standard ops TensorRT
    # fuses itself, in one canonical form whatever the exporter wrote (and GQA without a KV Expand).
    "trt-native": (
        fuse_rmsnorm.PASS,
        fuse_sandwich_norm.PASS,
        insert_sliding_window_attention.PASS,
        insert_softcap.PASS,
        expand_sandwich_norm.PASS,
        expand_rmsnorm.PASS,
        expand_softcap.PASS,
        expand_attention.PASS,
    ),
}

PASSES: dict[str, Pass] = {p.name: p for passes in TARGETS.values() for p in passes}

# The onnxruntime execution provider an `ort` graph is lowered for (recorded in its manifest; the runner
# picks its providers by it). The CPU form's GroupQueryAttention masks left padding with attention_bias,
# which onnxruntime's CUDA kernel rejects; the CUDA form passes GQA no input that kernel refuses.
PROVIDERS = ("cpu", "cuda")
PROVIDER_FORMS: dict[tuple[str, str], dict[str, Pass]] = {  # (target, provider): passes replaced, by name
    ("ort", "cuda"): {lower_attention_ort.PASS.name: lower_attention_ort.PASS_CUDA},
}
# What a graph needs of its runtime, recorded in its manifest and checked when a runner loads it.
REQUIRES: dict[tuple[str, str], dict[str, str]] = {
    ("ort", "cpu"): {"onnxruntime": ">=1.32"},  # GroupQueryAttention's query_seqlens input (new in 1.32)
    ("ort", "cuda"): {"onnxruntime": ">=1.31.1"},  # no query_seqlens; 1.31.1 is the newest onnxruntime-gpu
}

# In-place KV cache graphs: what each target needs of the sliding layers' buffers. "ring": any C >=
# sliding_window (export/kv_cache.py); "full": the whole sequence, like a global layer's buffer.
SLIDING_BUFFERS: dict[str, str] = {
    "trt": "ring",  # the plugin writes slot position mod C
    # GroupQueryAttention cannot wrap a ring, so on a ring the sliding layers decode through the standard-op
    # branch once a sequence outgrows the window; on full buffers every layer decodes on GQA (its
    # local_window_size masks the window). Measured (benchmarks/inplace/results.md): full decodes 0.93x the
    # ring's time per token on the medium model and 0.64x on tiny, prefill even; the cost is memory only
    # past the window (cache_sizes: a buffer is never longer than the sequence), at most 1.33x the cache.
    "ort": "full",
    "trt-native": "full",  # TensorRT's KV-cache update is linear only
}

# Where "full" is a preference, not a need: the longest sequence (positions) given full sliding buffers; a
# longer one gets rings. GroupQueryAttention's CPU kernel costs in proportion to the positions it holds,
# whatever its window (benchmarks/ort_targets/results_gqa_length.md), while the standard-op branch on a
# ring costs by the ring's slots. Measured on the medium model (window 128, benchmarks/inplace/
# results_sliding_full_max.md): full buffers decode at 0.97x the ring's time at 300 positions, 0.96x at
# 700, 1.04x at 1000, 1.07x at 2000 and 1.16x at 4000; the crossover is near 1000 positions (an
# earlier ad hoc run had them even at 1030). With Gemma 2's window of 4096 the rule changes nothing below
# 4096 positions (a ring is never longer than the sequence) and gives rings beyond, where GQA over every
# position costs more than the standard ops over 4096 slots.
SLIDING_FULL_MAX: dict[str, int] = {"ort": 1024}


# Passes a quantized export (export/quantize.py: weights behind DequantizeLinear) does not run:
# - fuse_parallel_matmuls: ONNX's Concat takes no int4, and for int8 one MatMulNBits on the concatenated
#   weights saved at most 1.5 µs per layer (medium q/k/v) and nothing on gate/up or the 2B shapes
#   (benchmarks/quant/parallel_matmuls.md).
#   onnxruntime fuses each DQ -> MatMul into its own MatMulNBits instead.
# - lower_tied_head_ort, when the head is quantized: the head reads its own quantized [hidden, vocab]
#   copy, not Transpose(embedding), so there is no transposed float copy left to avoid.
SKIPPED_WHEN_QUANTIZED: dict[str, tuple[Pass, ...]] = {
    "weights": (fuse_parallel_matmuls.PASS,),
    "head": (lower_tied_head_ort.PASS,),
}


def passes_for(target: str, provider: str = "cpu", quantization: dict[str, Any] | None = None) -> tuple[Pass, ...]:
    """`target`'s passes (in `provider`'s form); for a quantized export (the manifest's `quantization`),
    without those SKIPPED_WHEN_QUANTIZED names."""
    from graph_passes.errors import OptimizeError

    if provider not in PROVIDERS:
        raise OptimizeError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    try:
        passes = TARGETS[target]
    except KeyError:
        raise OptimizeError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}") from None
    if provider != "cpu" and target != "ort":
        raise OptimizeError(f"--provider {provider} applies to the ort target only (target {target} has one form)")
    swap = PROVIDER_FORMS.get((target, provider), {})
    passes = tuple(swap.get(p.name, p) for p in passes)
    if not quantization:
        return passes
    skipped = SKIPPED_WHEN_QUANTIZED["weights"] + (SKIPPED_WHEN_QUANTIZED["head"] if quantization.get("head") else ())
    return tuple(p for p in passes if p not in skipped)

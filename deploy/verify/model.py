"""`g2trt verify MODEL.onnx`: any g2trt graph (export or optimized target) against the PyTorch model.

The reference weights are the model's own: `--checkpoint DIR`, else the source its manifest records
(a checkpoint path, or the seed of random weights, re-drawn). `trt`-target graphs run their plugin
nodes as the PyTorch reference ops (trt_plugins/ort_ops.py), so a TensorRT graph is checked here,
on CPU. Cases: deploy/verify/parity.py's parity cases (batch 2 with left padding, a prompt longer than the
window: window + 9 tokens, 4105 for a real checkpoint, unless `max_len` caps it, which the result then says),
prefill + 3 decode steps; bound: deploy/verify/parity.py's TOLERANCE for the model's dtype.

Quantized graphs (export/quantize.py) cannot meet those bounds; for them the max |logit diff| of the
cases is reported, not bounded, and the verdict is teacher-forced top-1 agreement over a token sequence
(deploy/verify/quality.py: agreement, mean KL, max / mean |logit diff|) against quality.AGREEMENT_BOUND.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from deploy.runners.base import InplaceRunner, Runner
from deploy.runners.factory import graph_contract
from deploy.runners.onnx_reference_runner import OnnxReferenceInplaceRunner, OnnxReferenceRunner
from deploy.runners.ort_runner import OrtInplaceRunner, OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.parity import TOLERANCE, Bound, Report, compare, compare_inplace, parity_cases
from deploy.verify.quality import AGREEMENT_BOUND, Quality, quality_ids, teacher_forced
from export.checkpoint import open_checkpoint
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import manifest_config, read_manifest
from export.weights import WeightSource, load_model, weights_from_description
from trt_plugins import ort_ops


class VerifyError(G2trtError, ValueError):
    """A model whose reference weights cannot be found."""


@dataclasses.dataclass(frozen=True)
class Verification:
    model: Path
    target: str  # "export" for an unoptimized graph
    dtype: str
    source: str
    report: Report
    bound: Bound
    longest: int  # tokens of the longest prompt verified
    window: int  # the model's sliding window
    quality: Quality | None = None  # quantized graphs only: teacher-forced against PyTorch fp32
    scheme: str | None = None  # quantized graphs: int8 / int4 / fp8
    agreement_bound: float | None = None  # quantized graphs: the verdict's lowest top-1 agreement

    @property
    def ok(self) -> bool:
        if self.quality is not None and self.agreement_bound is not None:
            return self.quality.top1_agreement >= self.agreement_bound
        return self.measured <= self.bound.value

    @property
    def measured(self) -> float:
        """What the bound applies to: max |Δlogit|, or that over the reference's max |logit| (half precision)."""
        return self.bound.measure(self.report)

    @property
    def crosses_window(self) -> bool:
        return self.longest > self.window

    def coverage(self) -> str:
        """One phrase saying whether the sliding window was crossed (a --max-len cap can prevent it)."""
        if self.crosses_window:
            return f"prompts up to {self.longest} tokens, across the {self.window}-token window"
        return f"NOT across the {self.window}-token window (prompts capped at {self.longest} tokens)"


def verify_model(
    model_path: str | Path,
    checkpoint: str | Path | None = None,
    *,
    reference: Runner | None = None,
    max_len: int | None = None,
    seed: int = 0,
    quality_tokens: int = 512,
) -> Verification:
    """Compare `model_path` with the fp32 PyTorch model of its weights (`reference`, if given, is that
    model already loaded: the pipeline verifies three targets against one)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.onnx"
    manifest = read_manifest(model_path)
    cfg = manifest_config(manifest)
    source = _source(manifest, checkpoint, model_path)
    if source.config != cfg:
        raise VerifyError(f"{checkpoint or model_path}: its config differs from the model's manifest config")
    options = manifest.get("options") or {}
    dtype = str(manifest.get("dtype") or options.get("dtype") or "fp32")
    if reference is None:
        reference = TorchRunner(load_model(source, "fp32", last_logits_only=bool(options.get("last_logits_only"))))
    cases = parity_cases(cfg, seed, max_len)
    candidate = candidate_runner(model_path, cfg, dtype)
    if candidate.kv_cache == "inplace":
        report = compare_inplace(reference, candidate, cases)
    else:
        report = compare(reference, candidate, cases)
    described = str(checkpoint) if checkpoint else _describe(manifest.get("source") or {})
    longest = max(c.input_ids.shape[1] for c in cases)
    target = manifest.get("target", "export")
    v = Verification(model_path, target, dtype, described, report, TOLERANCE[dtype], longest, cfg.sliding_window)
    quantization = manifest.get("quantization")
    if not quantization:
        return v
    ids = quality_ids(cfg, min(quality_tokens, cfg.max_position_embeddings), seed)
    quality = teacher_forced(reference, candidate, ids, stepwise=bool(options.get("last_logits_only")))
    scheme = str(quantization["scheme"])
    return dataclasses.replace(v, quality=quality, scheme=scheme, agreement_bound=AGREEMENT_BOUND[scheme])


def _source(manifest: dict, checkpoint: str | Path | None, model_path: Path) -> WeightSource:
    if checkpoint is not None:
        return open_checkpoint(checkpoint)
    description = manifest.get("source")
    if not description:
        raise VerifyError(f"{model_path}: its manifest does not record its weights; pass --checkpoint DIR")
    try:
        return weights_from_description(description, manifest_config(manifest))
    except G2trtError as e:
        raise VerifyError(f"{model_path}: {e}; pass --checkpoint DIR") from None


def candidate_runner(model_path: Path, cfg: Gemma2Config, dtype: str) -> Runner | InplaceRunner:
    """onnxruntime for any fp32/fp16 g2trt graph (plugin nodes run as trt_plugins.ort_ops reference ops);
    onnx's reference evaluator for bf16 graphs, which onnxruntime's CPU provider cannot run. The runner
    keeps the graph's KV cache contract (its manifest says which)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    plugins = ort_ops.uses_plugin_ops(proto)
    contract, full_sliding = graph_contract(read_manifest(model_path))
    if dtype == "bf16":
        if plugins:
            raise VerifyError(f"{model_path}: a bf16 graph with plugin nodes has no CPU runtime to verify it here")
        if contract == "inplace":
            runner = OnnxReferenceInplaceRunner(model_path, cfg, name="onnx reference evaluator")
            runner.full_sliding = full_sliding
            return runner
        return OnnxReferenceRunner(model_path, cfg, name="onnx reference evaluator")
    name = "onnxruntime + reference plugin ops" if plugins else "onnxruntime"
    if contract == "inplace":
        return OrtInplaceRunner(model_path, cfg, name=name, full_sliding=full_sliding)
    return OrtRunner(model_path, cfg, name=name)


def _describe(source: dict) -> str:
    if source.get("kind") == "random":
        return f"random weights (seed {source.get('seed')})"
    return str(source.get("path", "?"))

"""`g2trt verify MODEL.onnx`: any g2trt graph (export or optimized target) against the PyTorch model.

The reference weights are the model's own: `--checkpoint DIR`, else the source its manifest records
(a checkpoint path, or the seed of random weights, re-drawn). `trt`-target graphs run their plugin
nodes as the PyTorch reference ops (trt_plugins/ort_ops.py), so a TensorRT graph is checked here,
on CPU. Cases: deploy/verify/parity.py's parity cases (batch 2 with left padding, a prompt longer than the
window), prefill + 3 decode steps; bound: deploy/verify/parity.py's TOLERANCE for the model's dtype.

Quantized graphs (export/quantize.py) cannot meet a 1e-4 bound; for them the max |logit diff| of those
cases is reported, not bounded, and the verdict is teacher-forced top-1 agreement over a token sequence
(deploy/verify/quality.py: agreement, mean KL, max / mean |logit diff|) against quality.AGREEMENT_BOUND.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from deploy.runners.base import Runner
from deploy.runners.onnx_reference_runner import OnnxReferenceRunner
from deploy.runners.ort_runner import OrtRunner
from deploy.runners.torch_runner import TorchRunner
from deploy.verify.parity import TOLERANCE, Report, compare, parity_cases
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
    bound: float  # on max |logit diff|; for quantized graphs, on teacher-forced top-1 agreement
    quality: Quality | None = None  # quantized graphs only
    scheme: str | None = None  # quantized graphs: int8 / int4 / fp8

    @property
    def ok(self) -> bool:
        if self.quality is not None:
            return self.quality.top1_agreement >= self.bound
        return self.report.worst <= self.bound


def verify_model(
    model_path: str | Path,
    checkpoint: str | Path | None = None,
    *,
    reference: Runner | None = None,
    max_len: int = 512,
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
    candidate = candidate_runner(model_path, cfg, dtype)
    report = compare(reference, candidate, parity_cases(cfg, seed, max_len))
    described = str(checkpoint) if checkpoint else _describe(manifest.get("source") or {})
    target = manifest.get("target", "export")
    quantization = manifest.get("quantization")
    if not quantization:
        return Verification(model_path, target, dtype, described, report, TOLERANCE[dtype])
    ids = quality_ids(cfg, min(quality_tokens, cfg.max_position_embeddings), seed)
    quality = teacher_forced(reference, candidate, ids, stepwise=bool(options.get("last_logits_only")))
    scheme = str(quantization["scheme"])
    return Verification(model_path, target, dtype, described, report, AGREEMENT_BOUND[scheme], quality, scheme)


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


def candidate_runner(model_path: Path, cfg: Gemma2Config, dtype: str) -> Runner:
    """onnxruntime for any fp32/fp16 g2trt graph (plugin nodes run as trt_plugins.ort_ops reference ops);
    onnx's reference evaluator for bf16 graphs, which onnxruntime's CPU provider cannot run."""
    proto = onnx.load(str(model_path), load_external_data=False)
    plugins = ort_ops.uses_plugin_ops(proto)
    if dtype == "bf16":
        if plugins:
            raise VerifyError(f"{model_path}: a bf16 graph with plugin nodes has no CPU runtime to verify it here")
        return OnnxReferenceRunner(model_path, cfg, name="onnx reference evaluator")
    return OrtRunner(model_path, cfg, name="onnxruntime + reference plugin ops" if plugins else "onnxruntime")


def _describe(source: dict) -> str:
    if source.get("kind") == "random":
        return f"random weights (seed {source.get('seed')})"
    return str(source.get("path", "?"))

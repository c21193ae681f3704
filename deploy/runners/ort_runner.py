"""onnxruntime as a runner (CPU EP here; CUDA EP where onnxruntime-gpu and a GPU are present).

Providers follow the graph's manifest: an `ort` graph lowered for the CPU provider (its GroupQueryAttention
takes attention_bias, which onnxruntime's CUDA kernel rejects) runs on the CPU provider only; one lowered
with `--provider cuda`, and every other graph, gets CUDA first where this onnxruntime has it. What the
manifest says the graph requires of onnxruntime (`requires`) is checked before the session is made.

Any g2trt graph runs here: the plain export, the `ort` target (com.microsoft contrib ops, built into
onnxruntime) and the `trt` target, whose g2trt plugin nodes run as the reference ops that
`trt_plugins.ort_ops` registers, so a TensorRT graph is checked token for token without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from deploy.runners.base import KVCache, contract_feeds, split_outputs, zeros_past
from export import io_contract as io
from export.config import Gemma2Config
from export.errors import G2trtError
from export.manifest import ManifestError, read_manifest

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRunner:
    def __init__(
        self,
        model_path: str | Path,
        config: Gemma2Config,
        *,
        name: str = "ort",
        threads: int | None = None,
        optimize: bool = True,
        providers: list[str] | None = None,
        session_options: ort.SessionOptions | None = None,
    ) -> None:
        self.name = name
        self.config = config
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        manifest = _manifest(model_path)
        check_requires(manifest, str(model_path))
        try:
            if uses_plugin_ops(model_path):
                self.session = plugin_session(model_path, so, providers)
            else:
                chosen = providers or providers_for(manifest)
                self.session = ort.InferenceSession(str(model_path), so, providers=chosen)
        except (_ort_errors.Fail, _ort_errors.InvalidGraph, _ort_errors.InvalidProtobuf, _ort_errors.NoSuchFile) as e:
            raise G2trtError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        check_contract(self.session, config, str(model_path))
        past_type = {i.name: i.type for i in self.session.get_inputs()}[io.past_name(0, "key")]
        if past_type not in _NP:
            raise G2trtError(f"{model_path}: KV cache type {past_type} cannot run on onnxruntime CPU")
        self.kv_dtype = _NP[past_type]

    def empty_past(self, batch: int) -> KVCache:
        return zeros_past(self.config, batch, self.kv_dtype)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        feeds = contract_feeds(input_ids, attention_mask, position_ids, past)
        return split_outputs(self.session.run(None, feeds))


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime has it (onnxruntime-gpu); onnxruntime falls back to CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def providers_for(manifest: dict[str, Any]) -> list[str]:
    """The providers the graph was lowered for: the CPU form of the `ort` target on CPU only, else CUDA first."""
    if manifest.get("target") == "ort" and manifest.get("provider", "cpu") == "cpu":
        return ["CPUExecutionProvider"]
    return default_providers()


def check_requires(manifest: dict[str, Any], source: str, installed: str | None = None) -> None:
    """One line if this onnxruntime is older than the graph's manifest requires (`requires.onnxruntime`)."""
    from deploy.engine.backend import version_tuple

    spec = str((manifest.get("requires") or {}).get("onnxruntime", ""))
    if not spec:
        return
    if not spec.startswith(">="):
        raise G2trtError(f"{source}: manifest requires onnxruntime {spec!r}; g2trt understands only '>=X.Y[.Z]'")
    installed = installed or ort.__version__
    if version_tuple(installed) < version_tuple(spec[2:]):
        hint = "; lower it again with --provider cuda" if manifest.get("provider", "cpu") == "cpu" else ""
        raise G2trtError(f"{source}: needs onnxruntime {spec}, this is {installed}: upgrade onnxruntime{hint}")


def _manifest(model_path: str | Path) -> dict[str, Any]:
    try:
        return read_manifest(model_path)
    except ManifestError:  # a hand-built graph: no recorded target, provider or requirement
        return {}


def uses_plugin_ops(model_path: str | Path) -> bool:
    """Whether the graph has g2trt plugin nodes (the `trt` target)."""
    import onnx

    from trt_plugins.spec import DOMAIN

    proto = onnx.load(str(model_path), load_external_data=False)
    return any(o.domain == DOMAIN for o in proto.opset_import)


def plugin_session(model_path: str | Path, so: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    """A session whose g2trt plugin nodes run as `trt_plugins.ort_ops` reference ops (CPU, via Python)."""
    try:
        from trt_plugins import ort_ops
    except ImportError as e:
        missing = f"{model_path}: has g2trt plugin nodes but their onnxruntime reference ops are missing ({e})"
        raise G2trtError(missing) from None
    return ort_ops.inference_session(model_path, so, providers or ["CPUExecutionProvider"])


def check_contract(session: ort.InferenceSession, cfg: Gemma2Config, source: str) -> None:
    """Fail with one line if the graph's input/output names are not the g2trt contract."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    for kind, got, want in (("inputs", got_in, io.input_names(cfg)), ("outputs", got_out, io.output_names(cfg))):
        if got != want:
            missing = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            raise G2trtError(
                f"{source}: graph {kind} differ from the g2trt contract "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})"
            )

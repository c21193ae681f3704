"""`manifest.json` beside every g2trt model: what it is, how it was made, and how to check its bytes.

Later stages (graph passes, engine build, runners) read the config and I/O contract from here rather
than guessing from the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import onnx

from export.config import Gemma2Config, config_from_hf_dict
from export.errors import G2trtError

MANIFEST = "manifest.json"
_TOOLS = ("g2trt", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnx-graphsurgeon", "transformers")


class ManifestError(G2trtError, ValueError):
    """A missing or unreadable manifest.json beside a model."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TOOLS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def io_signature(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and symbolic shapes of the graph inputs and outputs."""
    proto = onnx.load(str(model_path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                    if t.elem_type != onnx.TensorProto.BFLOAT16
                    else "bfloat16",
                    "shape": dims,
                }
            )
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def build_manifest(
    cfg: Gemma2Config, model_path: Path, options: Any, stage: str, hashes: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """Everything about `model_path` a later stage or a human needs; hashes every file it references
    (`hashes`: those already hashed as they were written, by file name)."""
    files = {model_path.name: sha256(model_path)}
    for data in sorted(model_path.parent.glob(model_path.name + ".data*")):
        files[data.name] = (hashes or {}).get(data.name) or sha256(data)
    opts = (
        dataclasses.asdict(options)
        if dataclasses.is_dataclass(options) and not isinstance(options, type)
        else dict(options)
    )
    return {
        "format": "g2trt-manifest/1",
        "stage": stage,
        "model": model_path.name,
        "config": cfg.to_hf_dict(),
        "dtype": opts.get("dtype"),
        "opset": opts.get("opset"),
        "options": opts,
        "io": io_signature(model_path),
        "sha256": files,
        "tools": tool_versions(),
        **extra,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(model_path: str | Path) -> dict[str, Any]:
    """The manifest beside `model_path` (a model file or its directory)."""
    model_path = Path(model_path)
    path = (model_path if model_path.is_dir() else model_path.parent) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found (every g2trt model has a manifest beside it)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise ManifestError(f"{path}: not a g2trt manifest (no 'config')")
    return manifest


def manifest_config(manifest: dict[str, Any]) -> Gemma2Config:
    return config_from_hf_dict(manifest["config"], MANIFEST)

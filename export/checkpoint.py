"""Hugging Face Gemma 2 checkpoint directories: config.json + safetensors (single or sharded).

Every tensor's name, shape and dtype is checked against the config *before* any weight is read, and
each failure names the file and the tensor. Tensors are then read one at a time (`get`), so an export
of a 27B checkpoint never holds more than one tensor in memory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from export.config import ConfigError, Gemma2Config, load_config
from export.errors import G2trtError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(G2trtError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


def expected_shapes(cfg: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma 2 checkpoint must hold, by HF name."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            shapes[p + norm + ".weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def weight_bytes(cfg: Gemma2Config, dtype: str) -> int:
    """Bytes of an export's weights in `dtype` (norm scales stay fp32)."""
    width = 4 if dtype == "fp32" else 2
    return sum(_numel(s) * (4 if len(s) == 1 else width) for s in expected_shapes(cfg).values())


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A validated HF checkpoint directory; `get(name)` reads one tensor."""

    def __init__(self, directory: Path, config: Gemma2Config, entries: dict[str, TensorEntry]) -> None:
        self.directory = directory
        self.config = config
        self.entries = entries

    @property
    def source_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's bytes are stored in."""
        by_dtype: dict[torch.dtype, int] = {}
        for e in self.entries.values():
            by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + _numel(e.shape)
        return max(by_dtype, key=lambda k: by_dtype[k])

    def names(self) -> Iterator[str]:
        return iter(expected_shapes(self.config))

    def describe(self) -> dict[str, str]:
        return {"kind": "checkpoint", "path": str(self.directory.resolve())}

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        try:
            with safe_open(str(entry.file), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r} ({e})") from None


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Read config and safetensors headers of `directory` and check them against each other."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    _refuse_non_float(directory)
    try:
        cfg = load_config(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _weight_files(directory)
    entries: dict[str, TensorEntry] = {}
    for file, names in files.items():
        for name, entry in _read_header(file).items():
            if names is not None and name not in names:
                continue  # the index assigns this name to another shard
            entries[name] = entry
        if names is not None:
            for name in sorted(names - entries.keys()):
                raise CheckpointError(f"{file}: tensor {name!r} listed in {INDEX} is not in this shard")
    listing = directory / (SINGLE if None in files.values() else INDEX)
    _check_against_config(cfg, entries, listing)
    return Checkpoint(directory, cfg, entries)


def _refuse_non_float(directory: Path) -> None:
    """A g2trt model or an already quantized checkpoint is not an export source (and cannot be re-quantized)."""
    manifest = directory / "manifest.json"
    if manifest.is_file() and not (directory / "config.json").is_file():
        try:
            raw = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = {}
        quant = (raw.get("quantization") or {}).get("scheme") if isinstance(raw, dict) else None
        what = f"an {quant}-quantized g2trt ONNX model" if quant else "a g2trt ONNX model"
        raise CheckpointError(
            f"{directory}: {what}, not a Hugging Face checkpoint; export (and --quant) from the float checkpoint"
        )
    try:
        raw_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # load_config reports it
    quant = raw_config.get("quantization_config") if isinstance(raw_config, dict) else None
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(
            f"{directory / 'config.json'}: an already quantized checkpoint (quantization_config: {method}); g2trt "
            "reads fp32/fp16/bf16 weights: export the float checkpoint, with --quant to quantize"
        )


def _weight_files(directory: Path) -> dict[Path, set[str] | None]:
    """Shard file -> names the index assigns to it (None: a single file holds everything)."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        shards: dict[Path, set[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(directory / shard, set()).add(name)
        for shard in shards:
            if not shard.exists():
                raise CheckpointError(f"{shard}: shard listed in {INDEX} is missing")
        return dict(shards)
    single = directory / SINGLE
    if single.exists():
        return {single: None}
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")


def _read_header(file: Path) -> dict[str, TensorEntry]:
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                out[name] = TensorEntry(file, tuple(sl.get_shape()), dtype)
            return out
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); truncated download?") from None


def _check_against_config(cfg: Gemma2Config, entries: dict[str, TensorEntry], listing: Path) -> None:
    """`listing`: the file that should have named a missing tensor (the single file, or the index)."""
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in entries:
            raise CheckpointError(f"{listing}: missing tensor {name!r} (shape {shape})")
        got = entries[name]
        if got.shape != shape:
            raise CheckpointError(f"{got.file}: tensor {name!r} has shape {got.shape}, config implies {shape}")
    # A tied checkpoint may still carry lm_head.weight (some exporters write it); it is ignored.
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name in sorted(entries.keys() - expected.keys() - tolerated):
        raise CheckpointError(f"{entries[name].file}: unexpected tensor {name!r}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

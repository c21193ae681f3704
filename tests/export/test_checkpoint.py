"""HF checkpoint directories: single and sharded files, dtypes, tied embeddings, and every bad input as a
one-line error that names the file and tensor, exits non-zero and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from deploy.cli import cli
from export.checkpoint import CheckpointError, open_checkpoint
from export.config import preset
from export.weights import RandomWeights, load_model
from tests.conftest import save_checkpoint


def test_single_file_loads_identical_weights(tiny_checkpoint: Path) -> None:
    ckpt = open_checkpoint(tiny_checkpoint)
    src = RandomWeights(ckpt.config)
    assert ckpt.config == preset("tiny")
    for name in src.names():
        assert torch.equal(ckpt.get(name), src.get(name)), name


def test_sharded_checkpoint_loads_identical_weights(tmp_path: Path) -> None:
    cfg = preset("tiny")
    path = save_checkpoint(cfg, tmp_path / "sharded", max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    model = load_model(open_checkpoint(path))
    ref = load_model(RandomWeights(cfg))
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path: Path, dtype: torch.dtype) -> None:
    cfg = preset("tiny")
    path = save_checkpoint(cfg, tmp_path / "half", dtype=dtype)
    ckpt = open_checkpoint(path)
    assert ckpt.source_dtype == dtype
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ckpt.get(name), RandomWeights(cfg).get(name).to(dtype))


def test_untied_checkpoint_needs_lm_head(tmp_path: Path) -> None:
    cfg = preset("tiny").replace(tie_word_embeddings=False)
    path = save_checkpoint(cfg, tmp_path / "untied")
    assert "lm_head.weight" in open_checkpoint(path).entries
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head\.weight'"):
        open_checkpoint(path)


# --- bad input: each case breaks a copy of the tiny checkpoint, then runs `g2trt export` on it ---------


def _drop(path: Path) -> None:
    w = load_file(path / "model.safetensors")
    del w["model.layers.1.mlp.down_proj.weight"]
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def _extra(path: Path) -> None:
    w = load_file(path / "model.safetensors")
    w["model.layers.9.mlp.down_proj.weight"] = torch.zeros(2)
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def _reshape(path: Path) -> None:
    w = load_file(path / "model.safetensors")
    w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def _model_type(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))


def _bad_json(path: Path) -> None:
    (path / "config.json").write_text('{"model_type": "gemma2", ')


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _no_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


BAD = {
    "missing tensor": (_drop, "model.safetensors", "missing tensor 'model.layers.1.mlp.down_proj.weight'"),
    "unexpected tensor": (_extra, "model.safetensors", "unexpected tensor 'model.layers.9.mlp.down_proj.weight'"),
    "shape mismatch": (_reshape, "model.safetensors", "'model.layers.0.self_attn.k_proj.weight' has shape (8, 64)"),
    "model_type": (_model_type, "config.json", "model_type is 'llama', expected 'gemma2'"),
    "unreadable json": (_bad_json, "config.json", "unreadable JSON"),
    "truncated shard": (_truncate, "model.safetensors", "truncated download?"),
    "no weights": (_no_weights, "tiny", "no model.safetensors or model.safetensors.index.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line_error_and_writes_nothing(tiny_checkpoint: Path, tmp_path: Path, case: str) -> None:
    breaker, file, message = BAD[case]
    ckpt = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, ckpt)
    breaker(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert file in lines[0] and message in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_shard_in_sharded_checkpoint_names_the_shard(tmp_path: Path) -> None:
    path = save_checkpoint(preset("tiny"), tmp_path / "sharded", max_shard_size="200KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(path)

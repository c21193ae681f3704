"""`g2trt package` writes a generation model beside the standard one; validation catches a config that lies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deploy.generate.tokenizer import write_id_tokenizer
from deploy.serve import triton_config as tc
from deploy.serve.generate_model import GenerateModelError, package_repository
from deploy.serve.package import validate_repository
from deploy.serve.protocol import INPUTS, OUTPUTS
from deploy.serve.runtime import ServingError, ServingParams
from export.errors import G2trtError


@pytest.fixture(scope="module")
def source(runtime_export, runtime_cfg, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("pkg-src")
    for f in runtime_export.model_path.parent.iterdir():
        os.link(f, src / f.name)
    write_id_tokenizer(runtime_cfg, src)
    return src


@pytest.fixture
def repo(source, tmp_path) -> Path:
    package_repository(source, tmp_path / "repo", params=ServingParams(slots=3, max_len=512, prefill_chunk=64))
    return tmp_path / "repo"


def test_generation_model_layout_and_config(repo):
    assert validate_repository(repo) == ["gemma2", "gemma2_generate"]
    model = repo / "gemma2_generate"
    assert sorted(p.name for p in (model / "1").iterdir()) == [
        "manifest.json",  # the graph's KV cache contract, read by the runtime
        "model.onnx",
        "model.onnx.data",
        "model.py",
        "tokenizer.json",
    ]
    config = tc.parse((model / "config.pbtxt").read_text())
    assert (config.backend, config.max_batch_size, config.model_transaction_policy.decoupled) == ("python", 0, True)
    assert [i.name for i in config.input] == [s.name for s in INPUTS]
    assert [i.name for i in config.input if not i.optional] == ["max_tokens"]
    assert [o.name for o in config.output] == [s.name for s in OUTPUTS]
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["slots"] == "3" and parameters["prefill_chunk"] == "64"
    assert json.loads((model / "g2trt.json").read_text())["format"] == "g2trt-generate/1"
    assert "from deploy.serve.triton_model import GenerateModel" in (model / "1" / "model.py").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("decoupled: true", "decoupled: false"), "decoupled must be true"),
        (lambda t: t.replace('name: "input_ids"', 'name: "tokens"'), "input ('tokens', 'TYPE_INT64', (-1,))"),
        (lambda t: t.replace('string_value: "3"', 'string_value: "three"'), "parameter slots must be an integer"),
        (lambda t: t.replace('key: "slots"', 'key: "slot"'), "unknown parameter 'slot'"),
        (lambda t: t.replace('string_value: "512"', 'string_value: "4096"'), "exceeds the model's max_position"),
    ],
)
def test_validation_catches_a_generation_config_that_lies(repo, edit, message):
    config = repo / "gemma2_generate" / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(G2trtError) as e:
        validate_repository(repo)
    assert message in str(e.value) and str(config) in str(e.value)


def test_validation_catches_missing_files(repo):
    (repo / "gemma2_generate" / "1" / "model.py").unlink()
    with pytest.raises(GenerateModelError, match=r"no model\.py"):
        validate_repository(repo)


def test_bad_settings_are_refused_before_anything_is_written(source, tmp_path):
    with pytest.raises(ServingError, match="slots must be >= 1"):
        ServingParams(slots=0)
    with pytest.raises(ServingError, match="prefill_chunk must be >= 0"):
        ServingParams(prefill_chunk=-1)
    with pytest.raises(G2trtError, match="exceeds the model's max_position_embeddings"):
        package_repository(source, tmp_path / "repo", params=ServingParams(max_len=10**6))
    assert not (tmp_path / "repo").exists()  # checked before the standard model was written


def test_no_generate_writes_the_standard_model_only(source, tmp_path):
    _, generation = package_repository(source, tmp_path / "repo", generate=False)
    assert generation is None and validate_repository(tmp_path / "repo") == ["gemma2"]

"""The engine side file: g2trt refuses corrupt engines and engines built for another TensorRT or GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deploy.engine.backend import import_backend
from deploy.engine.build import BuildOptions, build_engine
from deploy.engine.meta import (
    CorruptEngineError,
    EngineMetaError,
    IncompatibleEngineError,
    check_engine_compatible,
    load_engine_meta,
    meta_path,
    read_checked_engine,
)
from deploy.engine.report import BuildReport
from tests.deploy.build_graphs import contract_graph


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    d = tmp_path_factory.mktemp("meta")
    return build_engine(contract_graph(d / "model.onnx"), d / "model.engine", BuildOptions("tensorrt-rtx", (80, 89)))


@pytest.fixture
def engine(built: BuildReport, tmp_path: Path) -> Path:
    """A private copy of the built engine and its side file, free to damage."""
    out = tmp_path / "copy.engine"
    shutil.copy(built.engine, out)
    shutil.copy(built.meta_file, meta_path(out))
    return out


def version() -> str:
    return str(import_backend("tensorrt-rtx").version)


def test_sound_engine_passes_and_reports_its_profiles(engine: Path):
    meta = check_engine_compatible(engine, version(), 89, "tensorrt-rtx")
    assert meta.target_sms == (80, 89)
    assert meta.profile_index("decode") == 1
    assert check_engine_compatible(engine, version(), None).engine_magic == b"vtrt".hex()


def test_read_checked_engine_returns_the_plan(engine: Path):
    data, meta = read_checked_engine(engine, import_backend("tensorrt-rtx"), 80)
    assert len(data) == meta.engine_bytes and data[:4] == b"vtrt"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "corrupt or truncated engine"),
        (lambda p: p.write_bytes(b"XXXX" + p.read_bytes()[4:]), "corrupt engine \\(leading bytes 58585858"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00"), "corrupt or replaced engine \\(sha256"),
    ],
)
def test_corrupt_engine_is_one_line(engine: Path, damage, message):
    damage(engine)
    with pytest.raises(CorruptEngineError, match=message) as e:
        check_engine_compatible(engine, version(), 89)
    assert "\n" not in str(e.value) and str(engine) in str(e.value)


def test_corrupt_side_file(engine: Path):
    meta_path(engine).write_text("{not json")
    with pytest.raises(CorruptEngineError, match="not a g2trt engine side file"):
        load_engine_meta(engine)
    meta_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorruptEngineError, match="format 'something-else'"):
        load_engine_meta(engine)


def test_missing_side_file_or_engine(engine: Path, tmp_path: Path):
    meta_path(engine).unlink()
    with pytest.raises(EngineMetaError, match=r"no side file copy.engine.json"):
        check_engine_compatible(engine, version(), 89)
    with pytest.raises(EngineMetaError, match="no such engine file"):
        check_engine_compatible(tmp_path / "absent.engine", version(), 89)


def test_other_gpu_is_refused_with_the_fix(engine: Path):
    with pytest.raises(IncompatibleEngineError, match=r"built for SM 80 .*, SM 89 .*; this GPU is SM 86 .*--sm 86"):
        check_engine_compatible(engine, version(), 86)


def test_other_version_or_flavour_is_refused(engine: Path):
    with pytest.raises(IncompatibleEngineError, match=r"built by TensorRT-RTX 1.7.1.* runtime is TensorRT-RTX 1.8.0"):
        check_engine_compatible(engine, "1.8.0", 89)
    with pytest.raises(IncompatibleEngineError, match=r"cannot run on TensorRT \(rebuild with --backend tensorrt\)"):
        check_engine_compatible(engine, "10.15.1", 89, backend="tensorrt")
    # a different build number of the same release is the same TensorRT
    assert check_engine_compatible(engine, version().rsplit(".", 1)[0] + ".999", 89).backend == "tensorrt-rtx"


def test_side_file_records_the_build(built: BuildReport):
    raw = json.loads(built.meta_file.read_text())
    assert raw["format"] == "g2trt-engine/1"
    assert raw["onnx_sha256"] == built.meta.onnx_sha256 and len(raw["engine_sha256"]) == 64
    assert raw["build"]["layers"] == {"ACTIVATION": 2, "CAST": 2, "ELEMENTWISE": 1, "REDUCE": 1}
    assert raw["build"]["layers_source"] == "network"
    assert [p["name"] for p in raw["profiles"]] == ["prefill", "decode"]

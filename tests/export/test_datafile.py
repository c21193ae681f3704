"""Weights files written and copied with direct I/O, hashed on the way (export/datafile.py), and the export's
data file against `onnx_ir.save`'s (export/write.py): the same bytes, the manifest's hash of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from export import datafile
from export.config import preset
from export.datafile import HashedWriter, copy_hashed
from export.manifest import sha256
from export.onnx_export import DATA_FILE, DTYPES, ExportOptions, _attach_weights, export_onnx, trace_graph
from export.weights import RandomWeights


def _chunks(seed: int = 0) -> list[bytes]:
    """Pieces of awkward sizes: empty, one byte, across block boundaries, several blocks at once."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 4095, 8192, 3, 20000, 8191, 0, 77)]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_writer_writes_and_hashes_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    monkeypatch.setattr(datafile, "BLOCK", 8192)  # many block boundaries in a small file
    chunks = _chunks()
    path = tmp_path / "out.data"
    with HashedWriter(path, direct=direct) as out:
        for c in chunks:
            out.write(np.frombuffer(c, dtype=np.uint8) if len(c) % 2 else c)
        digest = out.close()
    data = b"".join(chunks)
    assert path.read_bytes() == data  # the padded last block is truncated away
    assert digest == hashlib.sha256(data).hexdigest() == sha256(path)


def test_copy_is_exact_and_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datafile, "BLOCK", 8192)
    src = tmp_path / "src.data"
    src.write_bytes(b"".join(_chunks(1)))
    digest = copy_hashed(src, tmp_path / "dst.data")
    assert (tmp_path / "dst.data").read_bytes() == src.read_bytes()
    assert digest == sha256(src)


def test_a_failed_write_is_raised_in_the_writing_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datafile, "BLOCK", 8192)
    calls = []

    def failing(fd: int, view: memoryview) -> None:
        calls.append(len(view))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datafile, "_write_all", failing)
    with pytest.raises(OSError, match="No space left"), HashedWriter(tmp_path / "out.data") as out:
        for c in _chunks():
            out.write(c)
        out.close()
    assert calls


def test_export_data_file_is_what_onnx_ir_save_writes(tmp_path: Path) -> None:
    cfg = preset("tiny")
    for dtype in ("fp32", "bf16"):
        result = export_onnx(RandomWeights(cfg), tmp_path / dtype, ExportOptions(dtype=dtype))  # type: ignore[arg-type]
        model = trace_graph(cfg, ExportOptions(dtype=dtype))  # type: ignore[arg-type]
        _attach_weights(model.graph, RandomWeights(cfg), DTYPES[dtype])
        ir.save(model, tmp_path / f"{dtype}.onnx", external_data=f"{dtype}.onnx.data")
        ours, theirs = tmp_path / dtype / DATA_FILE, tmp_path / f"{dtype}.onnx.data"
        assert ours.read_bytes() == theirs.read_bytes()
        assert result.manifest["sha256"][DATA_FILE] == sha256(ours)
        loaded = ir.load(result.model_path)
        for name, value in ir.load(tmp_path / f"{dtype}.onnx").graph.initializers.items():
            assert value.const_value is not None
            assert loaded.graph.initializers[name].const_value.tobytes() == value.const_value.tobytes(), name  # type: ignore[union-attr]

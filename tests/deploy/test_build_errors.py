"""`g2trt build` on bad input: one line that says what is wrong and what to do, and nothing written."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, save

from deploy.cli import cli
from deploy.engine.backend import (
    BackendMissingError,
    TrtBackend,
    UnsupportedTargetError,
    import_backend,
    parse_sm,
    resolve_backend,
)
from deploy.engine.build import BuildError, BuildOptions, build_engine
from deploy.engine.onnx_info import OnnxInputError
from deploy.engine.profiles import ProfileError
from tests.deploy.build_graphs import contract_graph, softcap_graph

RTX = BuildOptions("tensorrt-rtx", (89,))


def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine with neither flavour: importing them fails."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)


def one_line_cli(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_no_tensorrt_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    no_tensorrt(monkeypatch)
    model = contract_graph(tmp_path / "model.onnx")
    with pytest.raises(BackendMissingError, match="pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs"):
        build_engine(model, tmp_path / "model.engine")
    line = one_line_cli(["build", str(model), "--out", str(tmp_path / "model.engine")])
    assert "no TensorRT is installed" in line and "pip install" in line
    line = one_line_cli(["build", str(model), "--out", str(tmp_path / "m.engine"), "--backend", "tensorrt-rtx"])
    assert line == (
        "error: TensorRT-RTX is not installed (import of tensorrt_rtx_bindings halted; None in sys.modules): "
        "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs"
    )
    assert not list(tmp_path.glob("*.engine*"))


def test_type_stubs_alone_are_not_tensorrt(monkeypatch: pytest.MonkeyPatch):
    """`pip install tensorrt-stubs` leaves an importable, empty `tensorrt` namespace package."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendMissingError, match="only its type stubs are"):
        import_backend("tensorrt")
    assert resolve_backend("auto").name == "tensorrt-rtx"


def test_plugin_graph_on_tensorrt_rtx_is_refused_before_it_aborts(tmp_path: Path):
    """TensorRT-RTX 1.7 aborts the process on a Python plugin; g2trt refuses such graphs first."""
    model = softcap_graph(tmp_path / "trt.onnx")
    with pytest.raises(BuildError, match=r"has g2trt plugin nodes \(SoftCap x1\), and TensorRT-RTX .* trt-native"):
        build_engine(model, tmp_path / "trt.engine", RTX)
    with pytest.raises(BuildError, match="was built with --plugins"):
        build_engine(
            contract_graph(tmp_path / "model.onnx"), tmp_path / "m.engine", BuildOptions("tensorrt-rtx", plugins=True)
        )
    assert "SoftCap x1" in one_line_cli(["build", str(model), "--out", str(tmp_path / "x.engine")])


def test_plugin_graph_without_plugins_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from deploy.engine import build

    full = TrtBackend("tensorrt", types.SimpleNamespace(), "10.15.1")
    monkeypatch.setattr(build, "resolve_backend", lambda choice: full)
    with pytest.raises(BuildError, match="pass --plugins to register g2trt's TensorRT plugins"):
        build_engine(softcap_graph(tmp_path / "trt.onnx"), tmp_path / "trt.engine", BuildOptions("tensorrt"))


@pytest.mark.parametrize(
    ("sms", "message"),
    [
        (
            (90,),
            "cannot build for SM 90 \\(Hopper: H100, H200\\); it targets SM 75, 80, 86, 89, 120.* --backend tensorrt",
        ),
        ((87,), "cannot build for SM 87 \\(Jetson Orin\\)"),
    ],
)
def test_unsupported_sm(tmp_path: Path, sms: tuple[int, ...], message: str):
    with pytest.raises(UnsupportedTargetError, match=message):
        build_engine(
            contract_graph(tmp_path / "model.onnx"), tmp_path / "model.engine", BuildOptions("tensorrt-rtx", sms)
        )
    assert not (tmp_path / "model.engine").exists()


def test_sm_spellings():
    assert [parse_sm(s) for s in ("89", "8.9", "sm_89", "SM89", "12.0", 80)] == [89, 89, 89, 89, 120, 80]
    with pytest.raises(UnsupportedTargetError, match="--sm 'ampere'"):
        parse_sm("ampere")


def test_bf16_needs_sm80(tmp_path: Path):
    model = contract_graph(tmp_path / "model.onnx", dtype="bf16")
    with pytest.raises(UnsupportedTargetError, match=r"bf16 engines need SM 80 or newer \(--sm 75 has no bf16\)"):
        build_engine(model, tmp_path / "model.engine", BuildOptions("tensorrt-rtx", (75,)))


def test_auto_prefers_the_full_tensorrt_only_with_a_gpu(monkeypatch: pytest.MonkeyPatch):
    from deploy.engine import backend as trt_backend

    full = TrtBackend("tensorrt", types.SimpleNamespace(), "10.15.1")
    real_import = trt_backend.import_backend
    monkeypatch.setattr(trt_backend, "import_backend", lambda n: full if n == "tensorrt" else real_import(n))
    monkeypatch.setattr(trt_backend, "local_sm", lambda: None)
    assert resolve_backend("auto").name == "tensorrt-rtx"
    monkeypatch.setattr(trt_backend, "local_sm", lambda: 89)
    assert resolve_backend("auto") is full


def test_rtx_default_target_is_the_local_gpu(monkeypatch: pytest.MonkeyPatch):
    rtx = import_backend("tensorrt-rtx")
    monkeypatch.setattr("deploy.engine.backend.local_sm", lambda: None)
    assert rtx.resolve_targets(()) == (89,)
    monkeypatch.setattr("deploy.engine.backend.local_sm", lambda: 86)
    assert rtx.resolve_targets(()) == (86,)
    monkeypatch.setattr("deploy.engine.backend.local_sm", lambda: 90)
    with pytest.raises(UnsupportedTargetError, match=r"this GPU is SM 90 .*pass --sm to build for another GPU"):
        rtx.resolve_targets(())


def test_full_tensorrt_builds_only_for_the_local_gpu(monkeypatch: pytest.MonkeyPatch):
    from deploy.engine import gpu_info

    full = TrtBackend("tensorrt", types.SimpleNamespace(), "10.15.1")
    monkeypatch.setenv("G2TRT_NO_GPU", "1")
    gpu_info.local_sm.cache_clear()
    with pytest.raises(UnsupportedTargetError, match="builds for the GPU it runs on, and this machine has none"):
        full.resolve_targets(())
    monkeypatch.delenv("G2TRT_NO_GPU")
    gpu_info.local_sm.cache_clear()
    monkeypatch.setattr("deploy.engine.backend.local_sm", lambda: 90)
    assert full.resolve_targets(()) == (90,) == full.resolve_targets((90,))
    with pytest.raises(
        UnsupportedTargetError, match=r"only for this machine's GPU, SM 90 .*--sm 89 needs --backend tensorrt-rtx"
    ):
        full.resolve_targets((89,))


def test_impossible_profile_shapes(tmp_path: Path):
    model = contract_graph(tmp_path / "model.onnx", max_positions=256)
    with pytest.raises(
        ProfileError, match=r"past max 300 \+ 1 decode token exceeds the model's max_position_embeddings 256"
    ):
        build_engine(model, tmp_path / "model.engine", BuildOptions("tensorrt-rtx", (89,), max={"past": 300}))
    line = one_line_cli(
        ["build", str(model), "--out", str(tmp_path / "m.engine"), "--min", "batch=4", "--max", "batch=2"]
    )
    assert line == "error: profile batch needs min <= opt <= max, got min 4, opt 2, max 2"
    assert not list(tmp_path.glob("*.engine*"))


def test_bad_onnx_files(tmp_path: Path):
    with pytest.raises(OnnxInputError, match="no such ONNX file"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "x.engine", RTX)
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(OnnxInputError, match=r"junk.onnx: not a readable ONNX model"):
        build_engine(tmp_path / "junk.onnx", tmp_path / "x.engine", RTX)


def test_parser_errors_are_one_line(tmp_path: Path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 4])
    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="example.custom")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.custom", 1)],
    )
    save(model, tmp_path / "odd.onnx")
    with pytest.raises(
        BuildError, match=r"odd.onnx: TensorRT-RTX .* cannot parse the model: node mystery \(NoSuchOp\)"
    ) as e:
        build_engine(tmp_path / "odd.onnx", tmp_path / "odd.engine", RTX)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "odd.engine").exists()


def test_failed_build_keeps_the_previous_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from deploy.engine import build

    model = contract_graph(tmp_path / "model.onnx")
    report = build_engine(model, tmp_path / "model.engine", RTX)
    before = report.engine.read_bytes()

    def broken(*args, **kwargs):
        raise BuildError("simulated failure")

    monkeypatch.setattr(build, "_build_to_file", broken)
    with pytest.raises(BuildError, match="simulated"):
        build_engine(model, tmp_path / "model.engine", BuildOptions("tensorrt-rtx", (80,)))
    assert report.engine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json", "model.onnx"]

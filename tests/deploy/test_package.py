"""`g2trt package`: the Triton repository's layout and config.pbtxt, checked against the model's own I/O."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import onnx
import pytest

from deploy.engine.meta import EngineMeta, file_digest, write_engine_meta
from deploy.serve import triton_config as tc
from deploy.serve.package import PackageError, model_io, package, validate_repository
from export import io_contract as io
from export.errors import G2trtError

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


def read_config(model_dir: Path):
    return tc.parse((model_dir / "config.pbtxt").read_text())


def test_onnx_repository_layout_and_config(runtime_export, runtime_cfg, tmp_path):
    result = package(runtime_export.model_path.parent, tmp_path / "repo", name="gemma2_tiny", max_batch_size=4)
    model_dir = tmp_path / "repo" / "gemma2_tiny"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "g2trt.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx", "model.onnx.data"]
    data = model_dir / "1" / "model.onnx.data"
    assert os.path.samefile(data, runtime_export.model_path.parent / "model.onnx.data")  # hard link, no copy

    config = read_config(model_dir)
    assert (config.name, config.backend, config.max_batch_size) == ("gemma2_tiny", "onnxruntime", 4)
    assert config.default_model_filename == "model.onnx"
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [g.kind for g in config.instance_group] == [tc.INSTANCE_KINDS["KIND_AUTO"]]
    # Against the ONNX graph itself, independently of deploy.serve.package's reader:
    graph = onnx.load(str(runtime_export.model_path), load_external_data=False).graph
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [d.name for d in declared] == [v.name for v in values]
        for d, v in zip(declared, values, strict=True):
            t = v.type.tensor_type
            assert tc.data_type_name(d.data_type) == ONNX_TO_TRITON[t.elem_type]
            assert t.shape.dim[0].dim_param == io.BATCH
            assert list(d.dims) == [x.dim_value if x.HasField("dim_value") else -1 for x in t.shape.dim[1:]]
    assert [d.name for d in config.input] == io.input_names(runtime_cfg)
    past = next(d for d in config.input if d.name == io.past_name(0, "key"))
    assert list(past.dims) == [runtime_cfg.num_key_value_heads, -1, runtime_cfg.head_dim]
    assert result.server_command == f"tritonserver --model-repository={(tmp_path / 'repo').resolve()}"
    assert validate_repository(tmp_path / "repo") == ["gemma2_tiny"]


def test_ort_target_packages_and_trt_target_is_refused(runtime_target, tmp_path):
    package(runtime_target("ort"), tmp_path / "repo", name="ort")
    assert read_config(tmp_path / "repo" / "ort").backend == "onnxruntime"
    with pytest.raises(PackageError, match="g2trt plugin nodes"):
        package(runtime_target("trt"), tmp_path / "repo", name="trt")
    assert not (tmp_path / "repo" / "trt").exists()


@pytest.fixture
def repo(runtime_export, tmp_path) -> Path:
    package(runtime_export.model_path, tmp_path / "repo")
    return tmp_path / "repo"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name: "input_ids"', 'name: "tokens"'), "inputs differ from the model"),
        (lambda t: t.replace("dims: 32", "dims: 64", 1), "dims [2, -1, 64], the model has [2, -1, 32]"),
        (lambda t: t.replace("TYPE_FP32", "TYPE_FP16", 1), "is TYPE_FP16, the model has TYPE_FP32"),
        (lambda t: t.replace('name: "gemma2"', 'name: "other"'), "differs from its directory"),
        (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 8\nmax_batchsize: 2"), "no field named"),
        (lambda t: t.replace('backend: "onnxruntime"', 'backend: "pytorch"'), "not one g2trt packages"),
    ],
)
def test_validation_catches_a_config_that_lies(repo, edit, message):
    config = repo / "gemma2" / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(G2trtError, match=re.escape(message)):
        validate_repository(repo)


def test_validation_catches_missing_files(repo):
    (repo / "gemma2" / "1" / "model.onnx.data").unlink()
    with pytest.raises(PackageError, match=re.escape("external data file model.onnx.data is missing")):
        validate_repository(repo)
    (repo / "gemma2" / "1" / "model.onnx").unlink()
    with pytest.raises(PackageError, match=re.escape("no model.onnx")):
        validate_repository(repo)


def test_bad_options(runtime_export, tmp_path):
    for kw, message in (
        ({"name": "a/b"}, "--name"),
        ({"max_batch_size": 0}, "--max-batch-size"),
        ({"kind": "tpu"}, "--kind"),
    ):
        with pytest.raises(PackageError, match=message):
            package(runtime_export.model_path, tmp_path / "repo", **kw)


def planned_profiles(onnx_path: Path, batch: int = 8, decode_batch: int | None = None) -> tuple[dict, ...]:
    """The two profiles `g2trt build` plans for this graph (deploy/engine/profiles.py), as its side file has them."""
    from deploy.engine.onnx_info import inspect_onnx
    from deploy.engine.profiles import make_ranges, plan_profiles

    info = inspect_onnx(onnx_path)
    prefill, decode = plan_profiles(info.inputs, make_ranges(maxs={"batch": batch}, max_positions=info.max_positions))
    if decode_batch is not None:  # a decode profile with another max batch (not what g2trt build makes)
        decode = type(decode)(decode.name, {n: (lo, mid, (decode_batch, *hi[1:])) for n, (lo, mid, hi) in
                                            decode.shapes.items()})  # fmt: skip
    return (prefill.to_json(), decode.to_json())


def fake_engine(runtime_export, tmp_path: Path, backend: str, profiles: tuple[dict, ...] | None = None) -> Path:
    """Bytes standing in for a plan, with the side file `g2trt build` writes (packaging never deserializes)."""
    engine = tmp_path / f"{backend}.plan"
    engine.write_bytes(b"ftrt" + bytes(range(256)) * 4)
    size, digest, magic = file_digest(engine)
    meta = EngineMeta(
        backend=backend,
        trt_version="10.15.1",
        target_sms=(90,),
        dtype="fp32",
        onnx=str(runtime_export.model_path),
        onnx_sha256="",
        profiles=planned_profiles(runtime_export.model_path) if profiles is None else profiles,
        plugins={},
        engine_bytes=size,
        engine_sha256=digest,
        engine_magic=magic,
    )
    write_engine_meta(engine, meta)
    return engine


def test_engine_repository(runtime_export, tmp_path):
    engine = fake_engine(runtime_export, tmp_path, "tensorrt")
    result = package(engine, tmp_path / "repo", plugin_libraries=["/opt/plugins/libx.so"])
    model_dir = tmp_path / "repo" / "gemma2"
    assert (model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    config = read_config(model_dir)
    assert (config.backend, config.default_model_filename) == ("tensorrt", "model.plan")
    assert [g.kind for g in config.instance_group] == [tc.INSTANCE_KINDS["KIND_GPU"]]
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]  # prefill and decode
    assert config.max_batch_size == 8  # the profiles' max batch (g2trt build's default)
    meta = json.loads((model_dir / "g2trt.json").read_text())
    assert meta["requires"] == {"tensorrt": "==10.15.1"}
    inputs, outputs = model_io(runtime_export.model_path)
    assert [d.name for d in config.input] == [t.name for t in inputs]
    assert [d.name for d in config.output] == [t.name for t in outputs]
    assert 'plugins="/opt/plugins/libx.so"' in result.server_command
    validate_repository(tmp_path / "repo")
    with pytest.raises(PackageError, match="GPUs only"):
        package(engine, tmp_path / "repo2", kind="cpu")


def test_rtx_and_corrupt_engines_are_refused(runtime_export, tmp_path):
    with pytest.raises(PackageError, match="TensorRT-RTX"):
        package(fake_engine(runtime_export, tmp_path, "tensorrt-rtx"), tmp_path / "repo")
    engine = fake_engine(runtime_export, tmp_path, "tensorrt")
    with engine.open("ab") as f:
        f.write(b"x")
    with pytest.raises(G2trtError, match="corrupt or truncated"):
        package(engine, tmp_path / "repo")


def test_onnx_repository_records_what_it_requires_and_names_no_profile(runtime_target, tmp_path):
    package(runtime_target("ort"), tmp_path / "repo", name="ort")
    meta = json.loads((tmp_path / "repo" / "ort" / "g2trt.json").read_text())
    assert meta["requires"] == {"onnxruntime": ">=1.32"} and "engine" not in meta
    config = read_config(tmp_path / "repo" / "ort")
    assert config.max_batch_size == 8 and [list(g.profile) for g in config.instance_group] == [[]]


def test_the_cpu_form_of_the_ort_target_gets_cpu_instances(runtime_export, runtime_target, tmp_path):
    """Triton's GPU instances run onnxruntime's CUDA kernel, which rejects the CPU form's attention_bias."""
    package(runtime_target("ort"), tmp_path / "repo", name="auto")
    assert [g.kind for g in read_config(tmp_path / "repo" / "auto").instance_group] == [tc.INSTANCE_KINDS["KIND_CPU"]]
    with pytest.raises(PackageError, match="optimize with --target ort --provider cuda for GPU instances"):
        package(runtime_target("ort"), tmp_path / "repo", name="gpu", kind="gpu")
    from graph_passes import optimize

    cuda = optimize(runtime_export.model_path, "ort", tmp_path / "ort-cuda", provider="cuda").model_path
    package(cuda, tmp_path / "repo", name="cuda", kind="gpu")
    config = read_config(tmp_path / "repo" / "cuda")
    assert [g.kind for g in config.instance_group] == [tc.INSTANCE_KINDS["KIND_GPU"]]
    assert json.loads((tmp_path / "repo" / "cuda" / "g2trt.json").read_text())["requires"] == {
        "onnxruntime": ">=1.31.1"
    }


def test_the_batch_cap_is_the_smallest_profile_max(runtime_export, tmp_path):
    profiles = planned_profiles(runtime_export.model_path, batch=6, decode_batch=4)
    engine = fake_engine(runtime_export, tmp_path, "tensorrt", profiles)
    package(engine, tmp_path / "repo")
    assert read_config(tmp_path / "repo" / "gemma2").max_batch_size == 4
    with pytest.raises(PackageError, match=r"--max-batch-size 5 exceeds the engine's max batch 4 \(profile 'decode'\)"):
        package(engine, tmp_path / "repo2", max_batch_size=5)
    assert not (tmp_path / "repo2").exists()


@pytest.fixture(scope="module")
def rtx_engine(runtime_target, tmp_path_factory) -> Path:
    """A real TensorRT-RTX engine of the untied tiny model, max batch 3; its side file says "tensorrt"
    (the flavour Triton runs), as a full-TensorRT build would: `g2trt build` plans both the same way."""
    from deploy.engine.build import BuildOptions, build_engine
    from deploy.engine.meta import load_engine_meta

    engine = tmp_path_factory.mktemp("rtx") / "model.plan"
    ranges = {"opt": {"batch": 1, "seq": 16, "past": 32}, "max": {"batch": 3, "seq": 32, "past": 64}}
    build_engine(runtime_target("trt-native"), engine, BuildOptions("tensorrt-rtx", (89,), **ranges))
    write_engine_meta(engine, dataclasses.replace(load_engine_meta(engine), backend="tensorrt"))
    return engine


def test_engine_profiles_and_batch_cap_of_a_real_build(rtx_engine, tmp_path):
    package(rtx_engine, tmp_path / "repo")
    model_dir = tmp_path / "repo" / "gemma2"
    config = read_config(model_dir)
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]
    assert config.max_batch_size == 3  # the engine's --max batch, not the default 8
    engine = json.loads((model_dir / "g2trt.json").read_text())["engine"]
    assert [(p["index"], p["name"], p["max_batch"]) for p in engine["profiles"]] == [
        (0, "prefill", 3),
        (1, "decode", 3),
    ]
    package(rtx_engine, tmp_path / "two", max_batch_size=2)
    assert read_config(tmp_path / "two" / "gemma2").max_batch_size == 2
    with pytest.raises(PackageError, match="--max-batch-size 8 exceeds the engine's max batch 3"):
        package(rtx_engine, tmp_path / "eight", max_batch_size=8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('profile: "1"\n', ""), "must name every engine profile ['0', '1']"),
        (lambda t: t.replace("max_batch_size: 3", "max_batch_size: 8"), "max_batch_size 8 exceeds the engine's max"),
    ],
)
def test_validation_catches_profiles_and_batch_sizes_that_lie(rtx_engine, tmp_path, edit, message):
    package(rtx_engine, tmp_path / "repo")
    config = tmp_path / "repo" / "gemma2" / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(PackageError, match=re.escape(message)):
        validate_repository(tmp_path / "repo")

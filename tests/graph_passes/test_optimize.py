"""`optimize` end to end, per target: prefill and 3 decode steps, batch 2 with left padding, a prompt
longer than the window, against the unoptimized export in onnxruntime.

Bounds (max |logit diff| on valid positions): fp32 <= 1e-4 (measured ~1e-5); fp16 <= 1e-2 against the
unoptimized fp16 export (measured ~4e-3: fp16 rounding of a different op order; both stay within
deploy/verify/parity.py's fp16 bound against the fp32 PyTorch model). Random configs cover no GQA
expansion (KV == H), no soft-caps, an odd layer count, a global first layer and query_pre_attn_scalar !=
head_dim.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.runners.ort_runner import OrtRunner, check_requires, default_providers, providers_for
from deploy.verify.model import VerifyError, candidate_runner, verify_model
from deploy.verify.parity import Case, compare, parity_cases
from export.config import GLOBAL, SLIDING, Gemma2Config
from export.errors import G2trtError
from export.manifest import read_manifest
from export.onnx_export import ExportOptions, export_onnx
from export.weights import RandomWeights
from graph_passes import TARGETS, OptimizeError, SiteCountError, optimize
from graph_passes.graph import all_nodes
from trt_plugins.spec import DOMAIN

FP32_BOUND, FP16_BOUND = 1e-4, 1e-2


def _parity(plain: Path, optimized: Path, cfg: Gemma2Config) -> float:
    reference = OrtRunner(plain, cfg, name="plain export", optimize=False)
    report = compare(reference, candidate_runner(optimized, cfg, read_manifest(optimized)["dtype"]), parity_cases(cfg))
    return report.worst


@pytest.mark.parametrize("target", list(TARGETS))
def test_fp32_target_matches_the_export(target: str, tiny_export, tiny_cfg, tmp_path) -> None:
    plain = tiny_export("fp32").model_path
    report = optimize(plain, target, tmp_path / target)
    assert _parity(plain, Path(report.model_path), tiny_cfg) <= FP32_BOUND


@pytest.mark.parametrize("target", list(TARGETS))
def test_fp16_target_matches_the_export(target: str, tiny_export, tiny_cfg, tmp_path) -> None:
    plain = tiny_export("fp16").model_path
    report = optimize(plain, target, tmp_path / target)
    assert _parity(plain, Path(report.model_path), tiny_cfg) <= FP16_BOUND


def _unpadded_cases(cfg: Gemma2Config) -> list[Case]:
    """parity_cases without the padding: the batches whose one-token steps the CUDA form runs through GQA."""
    return [Case(c.name + ", no padding", c.input_ids, np.ones_like(c.attention_mask)) for c in parity_cases(cfg)]


@pytest.mark.parametrize(("dtype", "bound"), [("fp32", FP32_BOUND), ("fp16", FP16_BOUND)])
def test_ort_target_for_the_cuda_provider(dtype: str, bound: float, tiny_export, tiny_cfg, tmp_path) -> None:
    """The CUDA form: recorded in the manifest, no GQA input the CUDA kernel rejects, and as exact on
    onnxruntime's CPU provider as the CPU form, for padded (standard ops) and unpadded (GQA) batches."""
    plain = tiny_export(dtype).model_path
    report = optimize(plain, "ort", tmp_path / "ort", provider="cuda")
    manifest = read_manifest(tmp_path / "ort")
    assert (manifest["target"], manifest["provider"]) == ("ort", "cuda")
    assert manifest["requires"] == {"onnxruntime": ">=1.31.1"}
    assert "lower_attention_ort_cuda" in [p["name"] for p in manifest["passes"]]
    proto = onnx.load(report.model_path, load_external_data=False)
    gqa = [n for n in all_nodes(proto.graph) if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == tiny_cfg.num_hidden_layers
    assert all(len([i for i in n.input if i]) == 7 and len(n.input) <= 7 for n in gqa)
    reference = OrtRunner(plain, tiny_cfg, name="plain export", optimize=False)
    candidate = OrtRunner(report.model_path, tiny_cfg)
    for cases in (parity_cases(tiny_cfg), _unpadded_cases(tiny_cfg)):
        assert compare(reference, candidate, cases).worst <= bound


def test_manifest_provider_picks_the_runners_providers_and_requirements_are_checked(
    tiny_export, tmp_path, monkeypatch
) -> None:
    import onnxruntime

    plain = tiny_export("fp32").model_path
    optimize(plain, "ort", tmp_path / "cpu")
    cpu = read_manifest(tmp_path / "cpu")
    assert (cpu["provider"], cpu["requires"]) == ("cpu", {"onnxruntime": ">=1.32"})
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*both, "AzureExecutionProvider"])
    assert default_providers() == both  # as onnxruntime-gpu on a GPU machine would offer them
    assert providers_for(cpu) == ["CPUExecutionProvider"]  # its GQA's attention_bias: the CUDA kernel refuses it
    assert providers_for({**cpu, "provider": "cuda"}) == both  # the CUDA form: CUDA first
    assert providers_for(read_manifest(plain)) == both
    check_requires(cpu, "m.onnx", installed="1.32.0")
    with pytest.raises(G2trtError, match=r"m.onnx: needs onnxruntime >=1.32, this is 1.31.1: .*--provider cuda"):
        check_requires(cpu, "m.onnx", installed="1.31.1")
    check_requires(read_manifest(plain), "m.onnx", installed="1.0")  # the export requires nothing more


def random_config(seed: int) -> Gemma2Config:
    """A small Gemma 2 config drawn from a seeded RNG (reproducible 'random config')."""
    rng = np.random.default_rng(seed)
    kv = int(rng.choice([1, 2]))
    heads = kv * int(rng.choice([1, 2, 4]))
    layers = int(rng.integers(2, 4))
    head_dim = int(rng.choice([8, 16]))
    return Gemma2Config(
        vocab_size=int(rng.integers(300, 600)),
        hidden_size=int(rng.choice([32, 48])),
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        query_pre_attn_scalar=float(rng.choice([head_dim, 24])),
        sliding_window=int(rng.integers(3, 9)),
        layer_types=tuple(str(t) for t in rng.choice([SLIDING, GLOBAL], size=layers)),
        attn_logit_softcapping=[None, 20.0][int(rng.integers(2))],
        final_logit_softcapping=[None, 15.0][int(rng.integers(2))],
        max_position_embeddings=256,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 5, 6])  # KV == H; a global first layer; odd layers, one soft-cap
def test_random_configs_every_target(seed: int, tmp_path) -> None:
    cfg = random_config(seed)
    plain = export_onnx(RandomWeights(cfg, seed=seed), tmp_path / "export").model_path
    for target in TARGETS:
        report = optimize(plain, target, tmp_path / target)
        assert _parity(plain, Path(report.model_path), cfg) <= FP32_BOUND, (target, cfg)


def test_outputs_manifest_report_and_no_shared_weight_file(tiny_export, tmp_path) -> None:
    plain = tiny_export("fp32").model_path
    report = optimize(plain, "trt", tmp_path / "trt")
    out = tmp_path / "trt"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "passes.json",
        "passes.txt",
    ]
    assert (out / "model.onnx.data").stat().st_nlink == 1  # onnx refuses hard-linked external data
    onnx.checker.check_model(str(out / "model.onnx"))  # loads the weights: paths and offsets are valid
    m = read_manifest(out)
    assert (
        m["stage"] == "optimize" and m["target"] == "trt" and m["source"] == {"kind": "random", "seed": 0, "scale": 1.0}
    )
    assert [p["sites"] for p in m["passes"]] == [17, 8, 4, 1, 1]
    assert json.loads((out / "passes.json").read_text())["passes"][0]["count"] == 17
    text = (out / "passes.txt").read_text()
    assert "fuse_sandwich_norm" in text and f"{report.nodes_before} -> {report.nodes_after}" in text
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    plugins = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in plugins} == {"SandwichRMSNorm", "SlidingWindowAttention", "SoftCap"}
    assert all({"plugin_version", "plugin_namespace"} <= {a.name for a in n.attribute} for n in plugins)
    assert not proto.functions  # TensorRT resolves plugins by name, never through local functions


def test_a_missing_layer_is_an_error_naming_it(tiny_export, tmp_path) -> None:
    """Layer 2's attention soft-cap divisor changed: its attention site no longer matches."""
    src = tiny_export("fp32").model_path
    broken = tmp_path / "broken"
    shutil.copytree(src.parent, broken)
    proto = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    tanh = next(
        n
        for n in proto.graph.node
        if n.op_type == "Tanh" and any("layers.2.self_attn" in p.value for p in n.metadata_props)
    )
    div = next(n for n in proto.graph.node if tanh.input[0] in n.output)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(40.0, np.float32), "cap40"))
    div.input[1] = "cap40"
    onnx.save(proto, str(broken / "model.onnx"))
    with pytest.raises(
        SiteCountError,
        match=r"insert_sliding_window_attention matched 3 of the 4 sites .* "
        r"missing layer 2 \(scores / 40 are scaled back by 50",
    ):
        optimize(broken, "ort", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_errors_are_one_line(tiny_export, tmp_path) -> None:
    plain = tiny_export("fp32").model_path
    with pytest.raises(OptimizeError, match="unknown target"):
        optimize(plain, "tensorrt", tmp_path / "x")
    optimize(plain, "ort", tmp_path / "ort")
    with pytest.raises(OptimizeError, match=r"already optimized \(target ort\); optimize the export instead"):
        optimize(tmp_path / "ort", "trt", tmp_path / "y")
    with pytest.raises(OptimizeError, match="not found"):
        optimize(tmp_path / "nothing.onnx", "trt", tmp_path / "z")


def test_cli_optimize_then_verify(tiny_export, tmp_path) -> None:
    runner = CliRunner()
    plain = tiny_export("fp32").model_path
    res = runner.invoke(cli, ["optimize", str(plain), "--target", "trt", "--out", str(tmp_path / "trt")])
    assert res.exit_code == 0, res.output
    assert "insert_sliding_window_attention" in res.output
    res = runner.invoke(cli, ["verify", str(tmp_path / "trt" / "model.onnx")])
    assert res.exit_code == 0, res.output
    assert "ok: max |Δlogit|" in res.output and "SlidingWindowAttention" not in res.output
    bad = runner.invoke(cli, ["optimize", str(plain), "--target", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code != 0


def test_cli_provider_option(tiny_export, tmp_path) -> None:
    plain = str(tiny_export("fp32").model_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["optimize", plain, "--target", "ort", "--provider", "cuda", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "lower_attention_ort_cuda" in res.output and read_manifest(tmp_path / "o")["provider"] == "cuda"
    bad = runner.invoke(cli, ["optimize", plain, "--target", "trt", "--provider", "cuda", "--out", str(tmp_path / "t")])
    assert bad.exit_code == 1 and "--provider cuda applies to the ort target only" in bad.output
    assert not (tmp_path / "t").exists()


def test_verify_with_a_checkpoint(tiny_checkpoint, tmp_path) -> None:
    from export.checkpoint import open_checkpoint

    plain = export_onnx(open_checkpoint(tiny_checkpoint), tmp_path / "export", ExportOptions()).model_path
    optimize(plain, "ort", tmp_path / "ort")
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "ort"), "--checkpoint", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    assert str(tiny_checkpoint) in res.output.replace("\n", "")


def test_bf16_trt_native_is_verified_with_the_onnx_reference_evaluator(tiny_export, tmp_path) -> None:
    # onnxruntime's CPU provider has no bf16 kernels; verify_model falls back to onnx's reference evaluator.
    report = optimize(tiny_export("bf16").model_path, "trt-native", tmp_path / "trt-native")
    v = verify_model(report.model_path, max_len=24)
    assert v.ok and v.dtype == "bf16" and v.report.worst > 0, v.report.diffs


def test_bf16_ort_target_and_bf16_plugin_graph_are_refused_in_one_line(tiny_export, tmp_path) -> None:
    bf16 = tiny_export("bf16").model_path
    with pytest.raises(OptimizeError, match="ort target takes fp32 or fp16"):
        optimize(bf16, "ort", tmp_path / "ort")
    report = optimize(bf16, "trt", tmp_path / "trt")
    with pytest.raises(VerifyError, match="no CPU runtime"):
        verify_model(report.model_path)

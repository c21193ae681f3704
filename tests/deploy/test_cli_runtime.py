"""`g2trt generate / bench / package` from the command line: bad input is one line on stderr and exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from deploy.cli import cli
from deploy.generate.tokenizer import write_id_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, contains: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0], lines[0]


@pytest.fixture(scope="module")
def renamed_io(tmp_path_factory, runtime_export) -> Path:
    """A copy of the export whose `position_ids` input is called `positions` (not the contract)."""
    out = tmp_path_factory.mktemp("renamed")
    for f in runtime_export.model_path.parent.iterdir():
        shutil.copy(f, out / f.name)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        node.input[:] = ["positions" if i == "position_ids" else i for i in node.input]
    next(i for i in proto.graph.input if i.name == "position_ids").name = "positions"
    onnx.save(proto, str(out / "model.onnx"))
    return out


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory, tiny_checkpoint, tiny_cfg) -> Path:
    out = tmp_path_factory.mktemp("ckpt-tok") / "tiny"
    shutil.copytree(tiny_checkpoint, out)
    write_id_tokenizer(tiny_cfg, out)
    return out


def test_unknown_backend():
    one_line_error(run("generate", "--backend", "tensorflow", "--ids", "5 6"), "unknown backend 'tensorflow'")
    one_line_error(run("bench", "--backends", "torch,onnx"), "unknown backend 'onnx'")


def test_model_whose_io_names_differ_from_the_contract(renamed_io, tmp_path):
    one_line_error(run("generate", renamed_io, "--backend", "ort", "--ids", "5 6"), "differ from the g2trt contract")
    one_line_error(run("package", renamed_io, "--out", tmp_path / "repo"), "differ from the g2trt I/O contract")
    assert not (tmp_path / "repo" / "gemma2").exists()


def test_prompt_longer_than_max_positions(tiny_cfg):
    ids = " ".join(["5"] * (tiny_cfg.max_position_embeddings + 1))
    one_line_error(
        run("generate", "--ids", ids, "--max-new-tokens", "1"), "exceeds the model's max_position_embeddings"
    )


def test_missing_tokenizer(tiny_checkpoint):
    one_line_error(run("generate", tiny_checkpoint, "--prompt", "hello"), "no tokenizer.json")
    one_line_error(run("generate", "--prompt", "hello"), "no tokenizer.json")


def test_other_bad_input(tiny_checkpoint, tmp_path):
    one_line_error(run("generate", tmp_path / "missing", "--ids", "5"), "not found")
    one_line_error(run("generate", "--ids", "5 x"), "expected integers")
    one_line_error(run("generate", "--ids", "5", "--top-p", "0"), "--top-p must be in (0, 1]")
    one_line_error(run("generate", tiny_checkpoint, "--backend", "trt", "--ids", "5"), "needs an engine")
    one_line_error(run("package", tiny_checkpoint, "--out", tmp_path / "repo"), "package an ONNX model")
    one_line_error(run("bench", "--batch", "1,x"), "comma-separated list of int")
    one_line_error(run("bench", "--prompt", "1020", "--new", "8"), "exceeds the model's max_position_embeddings")


def test_generate_text_with_the_checkpoints_tokenizer(checkpoint_with_tokenizer):
    result = run(
        "generate",
        checkpoint_with_tokenizer,
        "--backend",
        "ort",
        "--prompt",
        "t5 t6 t7",
        "--prompt",
        "t9",
        "--max-new-tokens",
        "4",
        "--no-stop",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [o["prompt_ids"] for o in out["outputs"]] == [[2, 5, 6, 7], [2, 9]]  # <bos> prepended
    for o in out["outputs"]:
        assert len(o["new_ids"]) == 4 and o["text"] == " ".join(f"t{i}" for i in o["new_ids"])


def test_generate_ids_torch_and_ort_agree(checkpoint_with_tokenizer):
    outs = []
    for backend in ("torch", "ort"):
        result = run(
            "generate",
            checkpoint_with_tokenizer,
            "--backend",
            backend,
            "--ids",
            "2 5 6 7",
            "--ids",
            "2 9",
            "--max-new-tokens",
            "6",
            "--no-stop",
        )
        assert result.exit_code == 0, result.output
        outs.append(result.stdout.splitlines())
    assert outs[0] == outs[1] and len(outs[0]) == 2


def test_trt_backend_without_a_gpu_is_one_line(runtime_export, tmp_path):
    """An engine with its side file resolves (config from the ONNX it names); running it needs a GPU."""
    from deploy.engine.meta import EngineMeta, file_digest, write_engine_meta
    from deploy.runners.trt_runner import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU: the no-GPU error cannot happen")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"vtrt" + bytes(64))
    size, digest, magic = file_digest(engine)
    meta = EngineMeta("tensorrt-rtx", "1.7.1.116", (89,), "fp32", str(runtime_export.model_path), "", (), {},
                      size, digest, magic)  # fmt: skip
    write_engine_meta(engine, meta)
    one_line_error(run("generate", engine, "--backend", "trt", "--ids", "5 6"), "no CUDA GPU")
    one_line_error(run("generate", engine, "--backend", "ort", "--ids", "5 6"), "not an engine")


# The in-place KV cache from the command line (the default of generate, bench and pipeline).


def test_generate_defaults_to_the_inplace_cache_and_repeats(runtime_inplace_export, runtime_export):
    ids = ["--ids", "5 6 7 8", "--ids", "9 10", "--max-new-tokens", "12", "--no-stop", "--json"]
    inplace = run("generate", runtime_inplace_export.model_path, "--backend", "ort", *ids, "--repeat", "3")
    dynamic = run("generate", runtime_export.model_path, "--backend", "ort", *ids)
    torch_ = run("generate", "--backend", "torch", "--preset", "tiny", "--seed", "0", "--ids", "5 6", "--json")
    for result in (inplace, dynamic, torch_):
        assert result.exit_code == 0, result.output
    a, b = json.loads(inplace.stdout), json.loads(dynamic.stdout)
    assert a["kv_cache"] == "inplace" and b["kv_cache"] == "dynamic"
    assert json.loads(torch_.stdout)["kv_cache"] == "inplace"  # PyTorch runs the in-place contract by default
    assert [o["new_ids"] for o in a["outputs"]] == [o["new_ids"] for o in b["outputs"]]
    assert len(a["runs"]) == 3 and all(len(r["step_s"]) == 11 for r in a["runs"])  # 3 timed runs after a warm-up
    assert len(b["runs"]) == 1


def test_prefill_chunk_option(runtime_inplace_export):
    """--prefill-chunk auto (the default) | off | K: the same tokens; anything else is a usage error."""
    ids = ("--backend", "ort", "--ids", "5 6 7 8 9 10 11", "--max-new-tokens", "6", "--no-stop", "--json")
    outs = [
        run("generate", runtime_inplace_export.model_path, *ids, *chunk)
        for chunk in ((), ("--prefill-chunk", "off"), ("--prefill-chunk", "3"))
    ]
    for result in outs:
        assert result.exit_code == 0, result.output
    assert len({json.dumps(json.loads(r.stdout)["outputs"]) for r in outs}) == 1
    for bad in ("0", "x", "-2"):
        result = run("generate", runtime_inplace_export.model_path, *ids, "--prefill-chunk", bad)
        assert result.exit_code == 2 and "auto, off or a number of tokens >= 1" in result.output, result.output


def test_contract_mismatch_and_a_cache_that_cannot_hold_the_generation(runtime_inplace_export, runtime_export):
    ids = ("--backend", "ort", "--ids", "5 6")
    one_line_error(
        run("generate", runtime_inplace_export.model_path, *ids, "--kv-cache", "dynamic"),
        "a graph of the inplace KV cache contract, but --kv-cache dynamic was asked for",
    )
    one_line_error(
        run("generate", runtime_export.model_path, *ids, "--kv-cache", "inplace"),
        "a graph of the dynamic KV cache contract, but --kv-cache inplace was asked for",
    )
    one_line_error(
        run("generate", runtime_inplace_export.model_path, *ids, "--max-new-tokens", "1030"),
        "exceeds the model's max_position_embeddings",
    )


def test_engine_profile_that_does_not_fix_the_cache(runtime_inplace_export, tmp_path):
    from graph_passes import optimize

    native = optimize(runtime_inplace_export.model_path, "trt-native", tmp_path / "native").model_path
    engine = tmp_path / "e" / "m.engine"
    one_line_error(
        run("build", native, "--out", engine, "--sm", "89", "--min", "cache=64", "--max", "cache=128"),
        "profile cache must be fixed",
    )
    assert not engine.parent.exists() or not any(engine.parent.iterdir())


def test_console_entry_keeps_exit_codes_and_streams(tmp_path):
    """`main` (the `g2trt` script) skips the interpreter's teardown (os._exit): nothing of click's exit is lost."""

    def g2trt(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "deploy.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)

    ok = g2trt("export", "--help")
    assert ok.returncode == 0 and ok.stdout.startswith("Usage: g2trt export"), ok
    usage = g2trt("export")  # no --out
    assert usage.returncode == 2 and "Missing option '--out'" in usage.stderr, usage
    bad = g2trt("export", "--out", str(tmp_path / "o"), "--kv-cache", "inplace", "--opset", "18")
    assert bad.returncode == 1, bad
    assert bad.stderr.strip().splitlines() == [
        "error: --opset 18: the in-place KV cache needs opset >= 24 (ONNX TensorScatter)"
    ], bad.stderr
    assert not (tmp_path / "o").exists()

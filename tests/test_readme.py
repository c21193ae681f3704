"""The README's commands, run as a new user would: the main job end to end, and the test command CI runs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from deploy.serve.server import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_one_test_command() -> None:
    setup = _block_after("## Set up and run")
    assert len(setup) == 2 and setup[1].startswith("g2trt pipeline")
    assert "pip install torch==2.13.0" in setup[0] and "pip install -e '.[dev,rtx,serve]'" in setup[0]
    (test,) = _block_after("## Test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{test}\n" in ci, "CI must run the README's test command"


def test_the_main_job_runs_as_the_readme_says(tmp_path: Path) -> None:
    g2trt = shutil.which("g2trt")
    assert g2trt, "the g2trt console script is installed by `pip install -e .`"
    args = shlex.split(_block_after("## Set up and run")[1])
    out = tmp_path / "runs"
    args[args.index("--out") + 1] = str(out)
    done = subprocess.run([g2trt, *args[1:]], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads((out / "pipeline.json").read_text())}
    stages = ["export", "verify export", "verify trt", "verify ort", "verify trt-native", "build engine", "bench"]
    stages.append("serve")
    assert all(s in rows for s in stages), sorted(rows)
    for s in ("verify export", "verify trt", "verify ort", "verify trt-native"):
        assert rows[s]["result"].startswith("ok") and rows[s]["details"]["ok"], rows[s]
    assert rows["build engine"]["result"].startswith("ok"), rows["build engine"]  # TensorRT-RTX is in [rtx]
    # Packaged, served by a real Triton server, queried, stopped (the serve extra is in the README's setup;
    # an environment without it, or with numpy 2, gets the stage skipped with the reason):
    serve, reason = rows["serve"]["result"], unavailable_reason()
    assert serve == f"skipped: {reason}" if reason else serve.startswith("ok") and "stopped cleanly" in serve, serve
    for path in (
        "onnx/model.onnx",
        "trt/model.onnx",
        "ort/model.onnx",
        "trt-native/model.onnx",
        "engine/model.engine",
        "bench/bench.json",
        *(["triton/gemma2_generate/config.pbtxt"] if unavailable_reason() is None else []),
    ):
        assert (out / path).is_file(), path
    assert "g2trt pipeline" in done.stdout

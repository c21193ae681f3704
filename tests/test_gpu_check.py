"""benchmarks/gpu_check.py, the one script of every GPU check, runs end to end on a CPU in its smoke mode
(Triton's interpreter): so the script a lent GPU runs is known to work before the GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    status = {(r["section"], r["check"]): r["status"] for r in result["rows"]}
    kernels = [c for (s, c), st in status.items() if s == "kernels vs references"]
    assert len(kernels) == 6 and all(status[("kernels vs references", c)] == "ok" for c in kernels)
    assert status[("PyTorch model", "in-place = dynamic contract on cpu")] == "ok"
    assert {st for (s, _), st in status.items() if s in ("kernel timings", "runtimes")} == {"skipped"}  # no GPU
    assert (tmp_path / "smoke.md").is_file()

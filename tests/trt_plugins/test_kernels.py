"""Every Triton plugin kernel matches its PyTorch reference on CPU, under Triton's interpreter.

The parity tests live in `kernels_interpreted.py` and run here in a pytest subprocess with
TRITON_INTERPRET=1: Triton picks interpreted or compilable kernels when `@triton.jit` runs (at import), so
they cannot share a process with the ahead-of-time compile tests. One subprocess per plugin keeps a failure
report pointed at its kernel; its pytest output is the assertion message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize(
    "selection",
    [
        "softcap",
        "sandwich_rmsnorm",
        "attention_cases",
        "attention_random or window_blocks or rejects or refuse",
        "inplace_cases or inplace_generation",
        "inplace_random or inplace_reads or inplace_bad",
    ],
)
def test_kernels_match_reference_under_interpreter(selection: str, tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", str(HERE / "kernels_interpreted.py"), "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", selection, "--junitxml", str(tmp_path / "report.xml")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = (tmp_path / "report.xml").read_text() if (tmp_path / "report.xml").exists() else ""
    assert run.returncode == 0, (
        f"interpreter parity failed ({' '.join(cmd)}):\n{run.stdout[-8000:]}\n{run.stderr[-2000:]}"
    )
    assert 'tests="0"' not in report and 'skipped="0"' in report, f"no test ran, or one was skipped:\n{run.stdout}"

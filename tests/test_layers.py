"""Layers point one way: deploy uses export, graph_passes and trt_plugins; none of those imports deploy.

Checked on the source (every `import`/`from` statement, lazy ones inside functions included), so a
violation is caught even on a code path no other test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("export", "graph_passes", "trt_plugins")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_lower_layers_never_import_deploy() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package in LOWER
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(_imports(path))
        if name == "deploy" or name.startswith("deploy.")
    ]
    assert not offenders, offenders


def test_export_imports_no_later_stage() -> None:
    """export/ is the bottom: it knows neither the passes nor the plugins."""
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "export").rglob("*.py"))
        for name in sorted(_imports(path))
        if name.split(".")[0] in ("graph_passes", "trt_plugins", "deploy")
    ]
    assert not offenders, offenders


def test_deploy_is_organised_by_job() -> None:
    """deploy/ keeps only the CLI, the pipeline and terminal output at its top; every job has a room."""
    top = sorted(p.name for p in (ROOT / "deploy").glob("*.py"))
    assert top == ["__init__.py", "cli.py", "console.py", "pipeline.py"], top

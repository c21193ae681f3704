"""The one-line CLI error every bad input must give: exit 1, one stderr line starting `error: `."""

from __future__ import annotations

from click.testing import CliRunner

from deploy.cli import cli


def one_line_error(args: list[str]) -> str:
    """Run `g2trt ARGS`, check it failed in one line, return that line."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]

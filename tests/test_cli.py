"""The command line: version, help on every sub-command, one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from histocsc import __version__
from histocsc.cli import app


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "histocsc", *args], capture_output=True, text=True, timeout=120
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"histocsc {__version__}"


def sub_commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sub_commands())
def test_every_sub_command_has_help(name: str) -> None:
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    if "tiles" not in sub_commands():
        pytest.skip("tiles command not present")
    missing = tmp_path / "nope.svs"
    result = run_cli("tiles", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr
    debug = run_cli("--debug", "tiles", str(missing), "--out", str(tmp_path / "out"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr

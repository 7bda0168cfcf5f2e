"""The project's own lint rules run with the tests, so CI enforces them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_to_fix() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout


def test_ruff_format_leaves_every_file_as_it_is() -> None:
    result = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout


def test_the_node_agent_runs_on_amazon_linux_2023_python_3_9() -> None:
    result = _run(str(BIN / "vermin"), "--no-tips", "--violations", "-t=3.9-", "userdata/agent")
    assert result.returncode == 0, result.stdout + result.stderr

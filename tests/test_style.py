"""The style rules (README, "How we want the code") as a test, so that CI, which runs pytest only, lints
too: ruff's lint rules (pyproject's [tool.ruff.lint]) and its formatter over every Python tree of the
project. ruff is pinned in setup.py's test extra, because a newer formatter can restyle unchanged code."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ("sfgrpo", "tests", "configs", "benchmarks", "launch")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_project_passes_ruff(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *TREES], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, (
        f"`ruff {' '.join(command)}` fails (fix with `ruff check --fix` / `ruff format`):\n"
        f"{done.stdout}{done.stderr}"
    )

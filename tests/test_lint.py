"""The linter and the type checker run with the tests (issue 18): ``ruff check`` over the code and
its tests, ``mypy`` over server, client and trainer as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.lint, pytest.mark.timeout(300)]

#: What ruff checks (its settings: pyproject.toml [tool.ruff]).
RUFF_PATHS = ["server", "client", "trainer", "tests", "benchmarks", "scripts"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=280)


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", "--no-fix", "--output-format=concise", *RUFF_PATHS)
    assert result.returncode == 0, f"ruff check {' '.join(RUFF_PATHS)}:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing() -> None:
    # The files, the search path and the strictness come from pyproject.toml [tool.mypy].
    result = run("mypy")
    assert result.returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"

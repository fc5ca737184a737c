"""The code passes ruff's checks and mypy's type check as pyproject.toml configures them (run by .ci/run through pytest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff")
ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    paths = ["skillbank", "callbacks", "benchmarks", "tests", "examples"]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_ruff_formatted():
    """``ruff format`` leaves every file as it is (run it to fix this test)."""
    paths = ["skillbank", "callbacks", "benchmarks", "tests", "examples"]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_mypy_finds_nothing(tmp_path):
    """``skillbank`` and ``callbacks`` type-check with every function annotated (``[tool.mypy]`` in pyproject.toml)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout

"""The code passes ruff's checks as pyproject.toml configures them (unused imports, undefined names, …)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff")
ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    paths = ["skillbank", "callbacks", "benchmarks", "tests", "examples"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

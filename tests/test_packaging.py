"""The installed distribution says what the package says: one version, written in one place."""

from __future__ import annotations

import importlib.metadata

import skillbank


def test_the_version_has_one_source():
    assert importlib.metadata.version("skillbank") == skillbank.__version__

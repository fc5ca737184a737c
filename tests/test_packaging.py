"""The installed distribution says what the package says: one version, written in one place; the core stands alone."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

import skillbank
from skillbank import weights
from skillbank.pull import PULLED


def test_the_version_has_one_source():
    assert importlib.metadata.version("skillbank") == skillbank.__version__


# what may download or build benchmark data, and the edges that may call it (the CLI, its LightningCLI, DataModules)
_SCAFFOLDING = {"pull", "text_tasks", "text_data", "demo", "synthetic"}
_EDGES = {"cli", "fit", "table_data", "labelled_text"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_core_never_imports_what_downloads():
    """``pulled:`` aliases are resolved at the edges; the core reads folders and never imports ``skillbank.pull``."""
    root = Path(skillbank.__file__).parent
    core = [
        p
        for p in [*root.glob("*.py"), *root.glob("overlap/*.py"), *(root.parent / "callbacks").glob("*.py")]
        if p.stem not in _SCAFFOLDING | _EDGES
    ]
    assert len(core) > 20
    offenders = {p.name: sorted(m for m in _imported_modules(p) if m.removeprefix("skillbank.") in _SCAFFOLDING) for p in core}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert weights._PULLED == PULLED  # the spelled-out copy of the prefix agrees


def test_the_core_refuses_an_alias_with_what_to_do():
    from skillbank import SkillbankError, load_weights
    from skillbank.streaming import localize_streaming

    from skillbank.mask_learner import load_model

    for call in (
        lambda: load_weights("pulled:minilm"),
        lambda: localize_streaming("pulled:minilm", "x", 0.01, name="s"),
        lambda: load_model("pulled:minilm"),
    ):  # MaskLearner's and SequenceClassifier's loader: no pull on any rank
        with pytest.raises(SkillbankError, match=r"pulled model's alias.*resolve_model\('pulled:minilm'\)"):
            call()


def test_renamed_functions_still_answer_and_say_their_new_name():
    import torch

    state = {"w": torch.ones(2)}
    with pytest.warns(DeprecationWarning, match=r"load_weights\(\)"):
        assert skillbank.load_state_dict(state) == skillbank.load_weights(state) == state

"""The installed distribution says what the package says: one version, written in one place; the core stands alone."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

import skillbank
from skillbank.integrations.pulled.wheels import PULLED
from skillbank.vectors import models


def test_the_version_has_one_source():
    assert importlib.metadata.version("skillbank") == skillbank.__version__


ROOT = Path(skillbank.__file__).parent
# The data path, one subpackage a stage: what each may import besides the top level (errors, devices, sparse).
_MAY_IMPORT = {
    "vectors": set(),
    "localization": {"vectors", "storage", "stitching"},  # it makes skills, sized and learned against the stitched model
    "storage": set(),
    "stitching": {"vectors", "storage"},
    "comparison": {"vectors"},
    "callbacks": {"vectors", "localization", "storage", "stitching", "comparison"},
    "integrations": {"vectors", "localization", "storage", "stitching", "comparison", "callbacks"},
    "testbed": {"vectors", "localization", "storage", "stitching", "comparison", "callbacks", "integrations"},
}
# the edges that may reach the scaffolding: pulled: aliases (pull) and the demo
# the one edge that may reach the scaffolding: the demo command (testbed sits above everything, the product below it)
_EDGES_INTO_TESTBED = {"integrations/cli/running.py"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "skillbank":  # from skillbank import storage
                names.update(f"skillbank.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "skillbank" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in _MAY_IMPORT else None


def _sources() -> dict[str, Path]:
    files = {str(p.relative_to(ROOT)): p for p in ROOT.rglob("*.py")}
    files.update({f"callbacks/{p.name}": p for p in (ROOT.parent / "callbacks").glob("*.py")})
    return files


def test_each_stage_imports_only_the_stages_before_it():
    """The package layout is the data path: weights → task vectors → localization → skill and bank → stitching → edges."""
    sources = _sources()
    assert {rel.split("/")[0] for rel in sources if "/" in rel} == set(_MAY_IMPORT)
    offenders = {}
    for rel, path in sources.items():
        stage = rel.split("/")[0] if "/" in rel else None
        if stage is None:  # the top level: the lazy public API may name anything; errors, devices, sparse import no stage
            if rel != "__init__.py":
                assert {_stage(m) for m in _imported_modules(path)} <= {None}, rel
            continue
        allowed = _MAY_IMPORT[stage] | {stage} | ({"testbed"} if rel in _EDGES_INTO_TESTBED else set())
        found = sorted(m for m in _imported_modules(path) if _stage(m) not in allowed | {None})
        if found:
            offenders[rel] = found
    assert offenders == {}


def test_the_core_never_imports_what_downloads():
    """``pulled:`` aliases are resolved at the edges (``integrations``); the core reads folders and never imports
    ``skillbank.integrations.pulled``, and nothing but the demo command imports ``testbed``."""
    sources = _sources()
    core = {rel: p for rel, p in sources.items() if rel.split("/")[0] not in ("integrations", "testbed")}
    assert len(core) > 30
    offenders = {
        rel: sorted(m for m in _imported_modules(p) if m.startswith("skillbank.integrations")) for rel, p in core.items()
    }
    assert {rel: found for rel, found in offenders.items() if found} == {}
    into_testbed = {
        rel
        for rel, p in sources.items()
        if not rel.startswith("testbed/") and any(_stage(m) == "testbed" for m in _imported_modules(p))
    }
    assert into_testbed == {"integrations/cli/running.py"}
    assert PULLED is models.PULLED  # one spelling of the prefix, in the models room


def test_no_pre_release_shims_remain():
    """No release has been cut, so the module paths from before the grouping and the renamed functions are gone,
    not kept as deprecated aliases nobody outside has used."""
    for old in ("skillbank.stitcher", "skillbank.overlap", "skillbank._moved"):
        sys.modules.pop(old, None)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    assert not hasattr(skillbank, "load_state_dict") and not hasattr(skillbank.SkillBank, "list")


def test_the_core_refuses_an_alias_with_what_to_do():
    from skillbank import SkillbankError, load_weights
    from skillbank.localization.streaming import localize_streaming
    from skillbank.vectors.models import load_model

    for call in (
        lambda: load_weights("pulled:minilm"),
        lambda: localize_streaming("pulled:minilm", "x", 0.01, name="s"),
        lambda: load_model("pulled:minilm"),
    ):  # MaskLearner's and SequenceClassifier's loader: no pull on any rank
        with pytest.raises(SkillbankError, match=r"pulled model's alias.*resolve_model\('pulled:minilm'\)"):
            call()


def test_every_model_and_tokenizer_is_loaded_in_one_room():
    """Hugging Face loads (safetensors only, locally, the no-pickle guarantee) happen in ``skillbank.vectors.models``
    alone; PEFT's adapter loader stays with the adapters, behind their own safetensors check."""
    loads = {}
    for rel, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "from_pretrained" and rel != "vectors/models.py":
                loads.setdefault(rel, []).append(ast.unparse(node.value))
    assert loads == {"vectors/adapters.py": ["PeftModel"]}

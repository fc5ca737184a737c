"""Module paths from before the package was grouped by the data path, still importable (deprecated).

``import skillbank.stitcher`` (or a config's ``class_path: skillbank.classifier.SequenceClassifier``, or a saved
checkpoint that names an old path) gets the module at its new place, ``skillbank.stitching.stitcher`` — the same
module object, so classes and registries are not duplicated — with a :class:`DeprecationWarning` naming it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MOVED", "install"]

_GROUPS = {
    "vectors": ("weights", "task_vectors", "adapters"),
    "localization": ("localize", "streaming", "mask_learner", "mask_recipes", "causal_lm", "auto_sparsity", "fewshot"),
    "storage": ("format", "durable", "skill", "bank", "ranks"),
    "stitching": ("stitcher", "union_support", "multi_tensor", "overlap", "heads", "switching", "routing", "stitch_out"),
    "comparison": ("baselines", "arrivals"),
    "integrations": ("cli", "fit", "classifier", "table_data", "labelled_text", "plots", "report"),
    "testbed": ("demo", "synthetic", "text_tasks", "text_data", "pull"),
}
_RULES = ("mean", "rule", "sign_mean", "sum")

#: Old full module name -> its new full name.
MOVED: dict[str, str] = {
    **{f"skillbank.{old}": f"skillbank.{group}.{old}" for group, olds in _GROUPS.items() for old in olds},
    **{f"skillbank.overlap.{rule}": f"skillbank.stitching.overlap.{rule}" for rule in _RULES},
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers only for the old names: imports the new module and files it under the old name too."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def exec_module(self, module: ModuleType) -> None:
        old, new = module.__name__, MOVED[module.__name__]
        warnings.warn(
            f"{old} is now {new}; import it from there (the old path goes in a later release).", DeprecationWarning, stacklevel=2
        )
        # importlib hands back what sys.modules holds under the old name once this returns: the module at its new place
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once), so old names never load a second copy."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())

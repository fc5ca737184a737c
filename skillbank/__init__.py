"""skillbank: continual skill composition by sparse task arithmetic (Localize-and-Stitch).

Find the ~1% of parameters that carry each finetuned skill, keep every skill in
a durable :class:`SkillBank`, and stitch skills onto the base model as they
arrive with a :class:`Stitcher`, without touching earlier ones.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from skillbank.errors import (
    BankError,
    BankLockedError,
    BaseMismatchError,
    SkillbankError,
    SkillFileError,
    SkillNameError,
    StitchError,
    TaskVectorError,
    TimeLimitError,
)

# Where each public name lives. They are imported on first use, so ``import skillbank`` (and the CLI's
# --help and list) costs no torch, transformers or lightning import until a name that needs them is used.
_LAZY = {
    "SkillBank": "bank",
    "SkillEntry": "bank",
    "use_head": "heads",
    "localize_dataless": "localize",
    "skill_from_mask": "localize",
    "MaskLearner": "mask_learner",
    "RECIPES": "mask_recipes",
    "MaskRecipe": "mask_recipes",
    "Region": "skill",
    "Skill": "skill",
    "SkillMetadata": "skill",
    "Stitcher": "stitcher",
    "TaskVector": "task_vectors",
    "task_vector": "task_vectors",
    "align_names": "weights",
    "base_fingerprint": "weights",
    "load_weights": "weights",
    "load_state_dict": "weights",
}

if TYPE_CHECKING:
    from skillbank.bank import SkillBank, SkillEntry
    from skillbank.heads import use_head
    from skillbank.localize import localize_dataless, skill_from_mask
    from skillbank.mask_learner import MaskLearner
    from skillbank.mask_recipes import RECIPES, MaskRecipe
    from skillbank.skill import Region, Skill, SkillMetadata
    from skillbank.stitcher import Stitcher
    from skillbank.task_vectors import TaskVector, task_vector
    from skillbank.weights import align_names, base_fingerprint, load_state_dict, load_weights


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'skillbank' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"skillbank.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BankError",
    "BankLockedError",
    "BaseMismatchError",
    "MaskLearner",
    "MaskRecipe",
    "RECIPES",
    "Region",
    "Skill",
    "SkillBank",
    "SkillEntry",
    "SkillFileError",
    "SkillMetadata",
    "SkillNameError",
    "SkillbankError",
    "Stitcher",
    "StitchError",
    "TaskVector",
    "TaskVectorError",
    "TimeLimitError",
    "align_names",
    "base_fingerprint",
    "load_state_dict",
    "load_weights",
    "localize_dataless",
    "skill_from_mask",
    "task_vector",
    "use_head",
]

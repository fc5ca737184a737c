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
    "SkillBank": "storage.bank",
    "SkillEntry": "storage.bank",
    "use_head": "stitching.heads",
    "localize_dataless": "localization.localize",
    "skill_from_mask": "localization.localize",
    "MaskLearner": "localization.mask_learner",
    "LearnerSpec": "localization.spec",
    "LocalizationSpec": "localization.spec",
    "localize_finetune": "localization.finetune",
    "RECIPES": "localization.mask_recipes",
    "MaskRecipe": "localization.mask_recipes",
    "Region": "storage.skill",
    "Skill": "storage.skill",
    "SkillMetadata": "storage.skill",
    "Stitcher": "stitching.stitcher",
    "TaskVector": "vectors.task_vectors",
    "task_vector": "vectors.task_vectors",
    "align_names": "vectors.weights",
    "base_fingerprint": "vectors.weights",
    "load_weights": "vectors.weights",
}

if TYPE_CHECKING:
    from skillbank.localization.finetune import localize_finetune
    from skillbank.localization.localize import localize_dataless, skill_from_mask
    from skillbank.localization.mask_learner import MaskLearner
    from skillbank.localization.mask_recipes import RECIPES, MaskRecipe
    from skillbank.localization.spec import LearnerSpec, LocalizationSpec
    from skillbank.stitching.heads import use_head
    from skillbank.stitching.stitcher import Stitcher
    from skillbank.storage.bank import SkillBank, SkillEntry
    from skillbank.storage.skill import Region, Skill, SkillMetadata
    from skillbank.vectors.task_vectors import TaskVector, task_vector
    from skillbank.vectors.weights import align_names, base_fingerprint, load_weights


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
    "LearnerSpec",
    "LocalizationSpec",
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
    "load_weights",
    "localize_dataless",
    "localize_finetune",
    "skill_from_mask",
    "task_vector",
    "use_head",
]

"""skillbank: continual skill composition by sparse task arithmetic (Localize-and-Stitch).

Find the ~1% of parameters that carry each finetuned skill, keep every skill in
a durable :class:`SkillBank`, and stitch skills onto the base model as they
arrive with a :class:`Stitcher`, without touching earlier ones.
"""

from skillbank.bank import SkillBank, SkillEntry
from skillbank.errors import (
    BankError,
    BankLockedError,
    BaseMismatchError,
    SkillbankError,
    SkillFileError,
    SkillNameError,
    StitchError,
    TaskVectorError,
)
from skillbank.heads import use_head
from skillbank.localize import localize_dataless, skill_from_mask
from skillbank.mask_learner import MaskLearner
from skillbank.mask_recipes import RECIPES, MaskRecipe
from skillbank.skill import Region, Skill, SkillMetadata
from skillbank.stitcher import Stitcher
from skillbank.task_vector import TaskVector, task_vector
from skillbank.weights import align_names, base_fingerprint, load_state_dict

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
    "align_names",
    "base_fingerprint",
    "load_state_dict",
    "localize_dataless",
    "skill_from_mask",
    "task_vector",
    "use_head",
]

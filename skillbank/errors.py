"""The errors skillbank raises: each says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "BankError",
    "BaseMismatchError",
    "BankLockedError",
    "SkillFileError",
    "SkillbankError",
    "SkillNameError",
    "StitchError",
    "TaskVectorError",
    "TimeLimitError",
]


class SkillbankError(ValueError):
    """Base class of every error skillbank raises on bad input."""


class TaskVectorError(SkillbankError):
    """The base and finetuned weights cannot form a valid task vector."""


class BaseMismatchError(SkillbankError):
    """A skill, model or bank comes from a different base model."""


class SkillFileError(SkillbankError):
    """A skill file is corrupted, truncated, not a skill, or from a newer format."""


class SkillNameError(SkillbankError):
    """A skill name is unsafe, unknown, or already taken."""


class BankError(SkillbankError):
    """The bank directory cannot be opened or written."""


class BankLockedError(BankError, TimeoutError):
    """Another process holds the bank's write lock for too long.

    Also a :class:`TimeoutError`: waiting longer, or retrying later, may succeed
    (every other skillbank error needs the input fixed).
    """


class TimeLimitError(SkillbankError, TimeoutError):
    """Work that others wait on would outlast the time they can wait (e.g. a mask learned on one DDP rank)."""


class StitchError(SkillbankError):
    """A skill cannot be stitched onto (or removed from) the model."""

"""Rank discipline: rank 0 does a job, every rank learns how it went."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info

from skillbank.errors import SkillbankError
from skillbank.storage.skill import Skill

__all__ = ["bank_on_rank_zero", "raise_everywhere"]


def raise_everywhere(strategy: Strategy, error: BaseException | None, what: str) -> None:
    """Share rank 0's outcome: every rank raises (rank 0 its own error, the others its message) or none does.

    Without this, a failure on rank 0 leaves the other ranks waiting at the next
    collective until the timeout.
    """
    message = strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
    if error is not None:
        raise error
    if message is not None:
        raise SkillbankError(f"{what} failed on rank 0: {message}")


def bank_on_rank_zero(trainer: Trainer, bank: str | Path, make: Callable[[], Skill], what: str) -> Skill | None:
    """The one way a run writes a bank: rank 0 makes the skill and adds it, every rank learns how it went.

    Returns the skill on rank 0 (``None`` elsewhere); raises on every rank if making
    or adding it failed on rank 0. Used by ``MaskLearner`` and ``SkillHarvester``.
    """
    from skillbank.storage.bank import SkillBank

    skill, error = None, None
    if trainer.is_global_zero:
        try:
            skill = make()
            SkillBank(bank).add(skill)
            rank_zero_info(f"{what}: added {skill.name!r} ({skill.num_entries} entries) to {bank}")
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
            error = exc
    raise_everywhere(trainer.strategy, error, what)
    return skill

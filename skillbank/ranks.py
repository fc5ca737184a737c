"""Rank discipline: rank 0 does a job, every rank learns how it went."""

from __future__ import annotations

from lightning.pytorch.strategies import Strategy

from skillbank.errors import SkillbankError

__all__ = ["raise_everywhere"]


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

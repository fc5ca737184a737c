"""Serving many skills from one base: batches that each belong to one skill.

The :class:`~skillbank.Stitcher` switches a live model between skills
(``switch``, ``active``); :class:`~skillbank.callbacks.SkillStitcher` does it per
batch in Lightning's validate/test/predict when each batch names one skill.
:func:`group_by_skill` turns a mixed data set into such batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skillbank.errors import SkillbankError

__all__ = ["group_by_skill"]


def group_by_skill(skills: Sequence[str], batch_size: int, *, shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Index batches of at most ``batch_size`` examples, each of one skill: a ``DataLoader`` ``batch_sampler``.

    Args:
        skills: the skill of each example of the data set, by position.
        batch_size: examples per batch (the last batch of a skill may be smaller).
        shuffle: shuffle examples within each skill and the order of the batches (seeded).
        seed: the seed of the shuffle.

    >>> group_by_skill(["a", "b", "a", "a", "b"], 2)
    [[0, 2], [3], [1, 4]]
    """
    if batch_size < 1:
        raise SkillbankError(f"batch_size must be at least 1, got {batch_size}.")
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(skills):
        positions.setdefault(name, []).append(i)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for members in positions.values():
        if shuffle:
            members = [members[i] for i in torch.randperm(len(members), generator=generator, device="cpu").tolist()]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator, device="cpu").tolist()]
    return batches

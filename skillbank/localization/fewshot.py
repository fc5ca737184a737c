"""Class-balanced few-shot subsets, the data a :class:`~skillbank.localization.mask_learner.MaskLearner` learns from."""

from __future__ import annotations

import torch
from torch import Tensor

from skillbank.errors import SkillbankError

__all__ = ["balanced_indices"]


def balanced_indices(labels: Tensor, per_class: int, seed: int = 0) -> list[int]:
    """Up to ``per_class`` seeded random positions of each class in ``labels``, sorted.

    The paper learns each mask on 64 examples per class; a class with fewer
    examples contributes all of them.

    >>> balanced_indices(torch.tensor([0, 1, 0, 1, 1]), 1, seed=0)
    [0, 1]
    """
    if per_class < 1:
        raise SkillbankError(f"per_class must be at least 1, got {per_class}.")
    labels = torch.as_tensor(labels, device="cpu")  # beside the generator
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == label).squeeze(1)
        chosen += positions[torch.randperm(positions.numel(), generator=generator, device="cpu")[:per_class]].tolist()
    return sorted(chosen)

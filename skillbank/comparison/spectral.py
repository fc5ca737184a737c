"""Spectral merges of 2025 over whole task vectors: TSV-M, Iso-C and Iso-CTS
(:mod:`skillbank.vectors.spectral` merges one matrix; here every matrix of the model is merged by the method and
every other tensor averaged).

Matrices are the 2-D tensors outside the embeddings (as OPCM projects them); every other tensor is
averaged. The whole merge is then multiplied by ``scale`` (chosen on validation data, as for task
arithmetic). Pure functions of the task vectors, in float32 on the first one's device.

>>> import torch
>>> tau = {"w": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}
>>> iso_c([tau])["w"].tolist()  # singular values 2 and 1 flattened to their mean
[[1.5, 0.0], [0.0, 1.5]]
>>> torch.allclose(tsv_m([tau])["w"], tau["w"])  # one task: its own matrix
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from skillbank.comparison.baselines import TaskVectors, checked
from skillbank.errors import TaskVectorError
from skillbank.vectors.spectral import is_weight_matrix, iso_c_matrix, iso_cts_matrix, tsv_matrix

__all__ = ["iso_c", "iso_cts", "tsv_m"]

Matrices = Callable[[str, Tensor], bool]


def _merge(
    taus: TaskVectors, scale: float, matrices: Matrices | None, merge_matrix: Callable[[list[Tensor]], Tensor]
) -> dict[str, Tensor]:
    """``scale`` × (``merge_matrix`` of each matrix's task vectors; the mean of every other tensor)."""
    names, taus = checked(taus)
    is_matrix = matrices or is_weight_matrix
    merged: dict[str, Tensor] = {}
    for n in names:
        stack = [t[n].float() for t in taus]
        merged[n] = scale * (merge_matrix(stack) if is_matrix(n, stack[0]) else torch.stack(stack).mean(0))
    return merged


def tsv_m(taus: TaskVectors, scale: float = 1.0, matrices: Matrices | None = None) -> dict[str, Tensor]:
    """TSV-M: per matrix, each task's top ``max(1, r // T)`` singular triplets, both sides' stacked singular vectors
    replaced by their nearest orthonormal matrices, recombined with the kept singular values; times ``scale``."""
    return _merge(taus, scale, matrices, tsv_matrix)


def iso_c(taus: TaskVectors, scale: float = 1.0, matrices: Matrices | None = None) -> dict[str, Tensor]:
    """Iso-C: per matrix, ``σ̄ · U Vᵀ`` for the sum of the task vectors ``U Σ Vᵀ`` (``σ̄`` its mean singular value),
    so every direction of the sum gets the same weight; times ``scale``."""
    return _merge(taus, scale, matrices, iso_c_matrix)


def iso_cts(
    taus: TaskVectors, scale: float = 1.0, common_fraction: float = 0.8, matrices: Matrices | None = None
) -> dict[str, Tensor]:
    """Iso-CTS: per matrix of rank ``r``, the sum's top ``r − T·s`` directions (about ``common_fraction · r``) and
    each task's top ``s`` directions outside them, both sides decorrelated, every direction weighted by the mean of
    their singular values; ``common_fraction=1`` is Iso-C. Times ``scale``."""
    if not 0 < common_fraction <= 1:
        raise TaskVectorError(f"common_fraction must be in (0, 1], got {common_fraction}.")
    return _merge(taus, scale, matrices, lambda mats: iso_cts_matrix(mats, common_fraction))

"""Spectral merges of 2025: per weight matrix, the task vectors' singular directions rather than their entries.

* **TSV-M** (task singular vectors, Gargiulo et al., CVPR 2025): each task keeps its leading ``r/T``
  singular directions; the directions of all tasks are decorrelated (each side replaced by its
  nearest orthonormal matrix) and recombined with the tasks' own singular values.
* **Iso-C** (isotropic merging in the common subspace, Marczak et al., ICML 2025): the sum of the task
  vectors with its spectrum flattened to the mean singular value.
* **Iso-CTS** (common and task-specific subspaces, same paper): the sum's leading directions plus each
  task's leading directions outside them, decorrelated, with a flat spectrum.

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

from skillbank.comparison.baselines import TaskVectors, checked, is_weight_matrix
from skillbank.errors import TaskVectorError

__all__ = ["iso_c", "iso_cts", "nearest_orthonormal", "tsv_m"]

Matrices = Callable[[str, Tensor], bool]


def nearest_orthonormal(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to ``a`` in Frobenius norm (its polar factor ``P Qᵀ`` for ``a = P S Qᵀ``):
    the whitening TSV-M and Iso-CTS decorrelate stacked singular vectors with."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


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


def _tsv_matrix(mats: list[Tensor]) -> Tensor:
    rank = min(mats[0].shape)
    keep = max(1, rank // len(mats))  # each task's share of the rank (at least one direction)
    us, ss, vhs = [], [], []
    for m in mats:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    u, vh = nearest_orthonormal(torch.cat(us, 1)), nearest_orthonormal(torch.cat(vhs, 0))
    return u @ torch.diag(torch.cat(ss)) @ vh


def tsv_m(taus: TaskVectors, scale: float = 1.0, matrices: Matrices | None = None) -> dict[str, Tensor]:
    """TSV-M: per matrix, each task's top ``max(1, r // T)`` singular triplets, both sides' stacked singular vectors
    replaced by their nearest orthonormal matrices, recombined with the kept singular values; times ``scale``."""
    return _merge(taus, scale, matrices, _tsv_matrix)


def _iso_c_matrix(mats: list[Tensor]) -> Tensor:
    u, s, vh = torch.linalg.svd(torch.stack(mats).sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_c(taus: TaskVectors, scale: float = 1.0, matrices: Matrices | None = None) -> dict[str, Tensor]:
    """Iso-C: per matrix, ``σ̄ · U Vᵀ`` for the sum of the task vectors ``U Σ Vᵀ`` (``σ̄`` its mean singular value),
    so every direction of the sum gets the same weight; times ``scale``."""
    return _merge(taus, scale, matrices, _iso_c_matrix)


def _iso_cts_matrix(mats: list[Tensor], common_fraction: float) -> Tensor:
    rank, tasks = min(mats[0].shape), len(mats)
    per_task = round((rank - int(rank * common_fraction)) / tasks)  # the task-specific share, equal for every task
    common = rank - per_task * tasks
    if per_task == 0:
        return _iso_c_matrix(mats)
    u, s, vh = torch.linalg.svd(torch.stack(mats).sum(0), full_matrices=False)
    uc = u[:, :common]
    us, ss, vhs = [uc], [s[:common]], [vh[:common]]
    for m in mats:
        outside = m - uc @ (uc.T @ m)  # the task's part outside the common subspace
        ut, st, vht = torch.linalg.svd(outside, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    u_all, vh_all = nearest_orthonormal(torch.cat(us, 1)), nearest_orthonormal(torch.cat(vhs, 0))
    return torch.cat(ss).mean() * (u_all @ vh_all)


def iso_cts(
    taus: TaskVectors, scale: float = 1.0, common_fraction: float = 0.8, matrices: Matrices | None = None
) -> dict[str, Tensor]:
    """Iso-CTS: per matrix of rank ``r``, the sum's top ``r − T·s`` directions (about ``common_fraction · r``) and
    each task's top ``s`` directions outside them, both sides decorrelated, every direction weighted by the mean of
    their singular values; ``common_fraction=1`` is Iso-C. Times ``scale``."""
    if not 0 < common_fraction <= 1:
        raise TaskVectorError(f"common_fraction must be in (0, 1], got {common_fraction}.")
    return _merge(taus, scale, matrices, lambda mats: _iso_cts_matrix(mats, common_fraction))

"""Spectral merges of one weight matrix: the task vectors' singular directions rather than their entries.

* **TSV-M** (task singular vectors, Gargiulo et al., CVPR 2025): each task keeps its leading ``r/T``
  singular directions; the directions of all tasks are decorrelated (each side replaced by its
  nearest orthonormal matrix) and recombined with the tasks' own singular values.
* **Iso-C** (isotropic merging in the common subspace, Marczak et al., ICML 2025): the sum of the task
  vectors with its spectrum flattened to the mean singular value.
* **Iso-CTS** (common and task-specific subspaces, same paper): the sum's leading directions plus each
  task's leading directions outside them, decorrelated, with a flat spectrum.

Pure functions of a list of same-shaped matrices, in float32. Whole models are merged with them by
:mod:`skillbank.comparison.spectral` (task vectors) and :mod:`skillbank.stitching.spectral` (a bank's skills).

>>> import torch
>>> iso_c_matrix([torch.tensor([[2.0, 0.0], [0.0, 1.0]])]).tolist()  # singular values 2 and 1 flattened
[[1.5, 0.0], [0.0, 1.5]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skillbank.errors import StitchError
from skillbank.registry import Registry

if TYPE_CHECKING:  # the CLI's --help lists the merges without torch
    from torch import Tensor

#: A matrix's top singular triplets ``(U, σ, Vᵀ)``.
Factors = tuple["Tensor", "Tensor", "Tensor"]

__all__ = [
    "MATRIX_MERGES",
    "Factors",
    "MatrixMerge",
    "is_weight_matrix",
    "iso_c_matrix",
    "iso_cts_matrix",
    "nearest_orthonormal",
    "svd",
    "top_factors",
    "tsv_keep",
    "tsv_matrix",
    "tsv_parts",
]


def is_weight_matrix(name: str, tensor: Tensor) -> bool:
    """Whether a tensor is a weight matrix the matrix-wise merges (OPCM, TSV-M, Iso-C) work on: 2-D, outside the
    embeddings (a vocabulary table is a lookup, not a linear map; it is averaged or added instead)."""
    return tensor.dim() == 2 and "embeddings" not in name


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ``a`` in float32; where LAPACK's float32 solver does not converge (a near-zero or
    ill-conditioned matrix, e.g. a task's residual outside a common subspace that holds nearly all of it), the same
    in float64, cast back."""
    import torch

    try:
        return torch.linalg.svd(a.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()


def nearest_orthonormal(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to ``a`` in Frobenius norm (its polar factor ``P Qᵀ`` for ``a = P S Qᵀ``):
    the whitening TSV-M and Iso-CTS decorrelate stacked singular vectors with."""
    p, _, qh = svd(a)
    return p @ qh


def tsv_keep(mats: Sequence[Tensor]) -> int:
    """How many singular directions TSV-M keeps of each of ``mats``: its share of the rank, at least one."""
    return max(1, min(mats[0].shape) // len(mats))


def top_factors(a: Tensor, keep: int) -> Factors:
    """``a``'s top ``keep`` singular triplets ``(U, σ, Vᵀ)``, each its own tensor (no view of the whole SVD)."""
    u, s, vh = svd(a)
    return u[:, :keep].clone(), s[:keep].clone(), vh[:keep].clone()


def tsv_parts(mats: list[Tensor], factors: Sequence[Factors] | None = None) -> list[Tensor]:
    """Each task's part of :func:`tsv_matrix`: its kept singular values between its columns of the decorrelated
    singular vectors (the parts add up to the merge, so each task's share can be weighted on its own).

    ``factors``: each task's top singular triplets where they are known already (at least :func:`tsv_keep` of
    them, as :func:`top_factors` gives them): the same parts, bit for bit, without those tasks' SVDs."""
    import torch

    if len(mats) == 1:  # one task keeps every direction, already orthonormal: its own matrix, exactly
        return [mats[0].float()]
    keep = tsv_keep(mats)
    known = list(factors) if factors is not None else [top_factors(m, keep) for m in mats]
    us = [u[:, :keep] for u, _, _ in known]
    ss = [s[:keep] for _, s, _ in known]
    vhs = [vh[:keep] for _, _, vh in known]
    u, vh = nearest_orthonormal(torch.cat(us, 1)), nearest_orthonormal(torch.cat(vhs, 0))
    blocks = [slice(i * keep, (i + 1) * keep) for i in range(len(mats))]
    return [u[:, b] @ torch.diag(s) @ vh[b] for b, s in zip(blocks, ss)]


def tsv_matrix(mats: list[Tensor]) -> Tensor:
    """TSV-M of one matrix: each task's top ``max(1, r // T)`` singular triplets, both sides' stacked singular
    vectors replaced by their nearest orthonormal matrices, recombined with the kept singular values."""
    import torch

    return torch.stack(tsv_parts(mats)).sum(0)


def iso_c_matrix(mats: list[Tensor]) -> Tensor:
    """Iso-C of one matrix: ``σ̄ · U Vᵀ`` for the sum of the task vectors ``U Σ Vᵀ`` (``σ̄`` its mean singular
    value), so every direction of the sum gets the same weight."""
    import torch

    u, s, vh = svd(torch.stack([m.float() for m in mats]).sum(0))
    return s.mean() * (u @ vh)


def iso_cts_matrix(mats: list[Tensor], common_fraction: float = 0.8) -> Tensor:
    """Iso-CTS of one matrix of rank ``r``: the sum's top ``r − T·s`` directions (about ``common_fraction · r``)
    and each task's top ``s`` directions outside them, both sides decorrelated, every direction weighted by the
    mean of their singular values (``s = round((r − ⌊common_fraction · r⌋) / T)``; ``s = 0`` is Iso-C)."""
    import torch

    rank, tasks = min(mats[0].shape), len(mats)
    per_task = round((rank - int(rank * common_fraction)) / tasks)  # the task-specific share, equal for every task
    if per_task == 0:
        return iso_c_matrix(mats)
    common = rank - per_task * tasks
    mats = [m.float() for m in mats]
    u, s, vh = svd(torch.stack(mats).sum(0))
    uc = u[:, :common]
    us, ss, vhs = [uc], [s[:common]], [vh[:common]]
    for m in mats:
        outside = m - uc @ (uc.T @ m)  # the task's part outside the common subspace
        ut, st, vht = svd(outside)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    u_all, vh_all = nearest_orthonormal(torch.cat(us, 1)), nearest_orthonormal(torch.cat(vhs, 0))
    return torch.cat(ss).mean() * (u_all @ vh_all)


@dataclass(frozen=True)
class MatrixMerge:
    """A spectral merge of one weight matrix: its name, one line for ``--help``, and the function.

    ``flattens``: the merge flattens the spectrum (Iso-C, Iso-CTS), so one matrix alone does not come back as
    itself (TSV-M's does): a composition of skills takes a matrix only one skill touches as that skill's own τ."""

    name: str
    summary: str
    merge: Callable[[list[Tensor]], Tensor]
    flattens: bool = False

    def __call__(self, mats: list[Tensor]) -> Tensor:
        """The merged matrix of the task vectors ``mats`` (scale 1)."""
        return self.merge(mats)


#: Each spectral merge of one matrix by name (Iso-CTS at the paper's common fraction 0.8); an unknown name is a
#: :class:`~skillbank.errors.StitchError` listing the known ones.
MATRIX_MERGES: Registry[MatrixMerge] = Registry("spectral merge", StitchError)
for _merge in (
    MatrixMerge("tsv_m", "each skill's top r/T singular directions, decorrelated (TSV-M, CVPR 2025)", tsv_matrix),
    MatrixMerge("iso_c", "the sum of the skills with a flat spectrum (Iso-C, ICML 2025)", iso_c_matrix, flattens=True),
    MatrixMerge(
        "iso_cts",
        "the sum's and each skill's own directions, decorrelated, flat spectrum (Iso-CTS)",
        iso_cts_matrix,
        flattens=True,
    ),
):
    MATRIX_MERGES.add(_merge.name, _merge)

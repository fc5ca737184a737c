"""Skills with a low-rank part: each weight matrix's top singular directions of ``τ``, and a sparse mask of the rest.

``localize_low_rank(tv, rank, sparsity)`` keeps, per weight matrix (2-D, outside the embeddings and ``exclude``),
``τ``'s top ``rank`` singular directions as a :class:`~skillbank.storage.low_rank.LowRank` part
(``U_r·diag(σ_r)`` and ``V_rᵀ``, as TSV-C compresses task vectors), and the dataless mask — the top
``ceil(s·P)`` of ``|τ − low-rank part|`` over all shared parameters — of what it leaves. The skill's
``τ`` is then ``low-rank part + sparse region`` in each matrix. Such a skill composes matrix by matrix
(``rule="tsv_m"``, ``"iso_c"``, ``"iso_cts"``), not by the per-entry overlap rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.localization.localize import dataless_settings, eligible_names, skill_from_mask
from skillbank.sparse import check_sparsity, global_topk, num_selected
from skillbank.storage.low_rank import LowRank
from skillbank.storage.skill import Skill
from skillbank.vectors.spectral import is_weight_matrix, svd
from skillbank.vectors.task_vectors import TaskVector

__all__ = ["localize_low_rank"]


def localize_low_rank(
    tv: TaskVector,
    rank: int,
    sparsity: float = 0.01,
    *,
    name: str,
    exclude: Sequence[str] = (),
    **skill_fields: Any,
) -> Skill:
    """The skill of ``tv`` with a rank-``rank`` part in every eligible weight matrix and a dataless mask of the rest.

    Args:
        tv: the task vector.
        rank: singular directions kept per matrix (at most the matrix's smaller side).
        sparsity: fraction of the eligible entries in the sparse mask of the residual.
        name, exclude, skill_fields: as in :func:`~skillbank.localization.localize.localize_dataless`.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SkillbankError(f"rank must be a whole number >= 1 (singular directions per matrix), got {rank!r}.")
    check_sparsity(sparsity)
    eligible = eligible_names(tv.shared, exclude)
    parts: dict[str, LowRank] = {}
    residual = dict(tv.shared)
    for pname in eligible:
        tau = tv.shared[pname]
        if not is_weight_matrix(pname, tau):
            continue
        u, s, vh = svd(tau)
        r = min(rank, s.numel())
        part = LowRank((u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous())
        parts[pname] = part
        residual[pname] = tau - part.dense().to(tau.device, tau.dtype)
    if not parts:
        raise SkillbankError("no weight matrix to give a low-rank part: every 2-D parameter is excluded or an embedding.")
    rest = replace(tv, shared=residual)
    k = num_selected(sparsity, sum(residual[p].numel() for p in eligible))
    indices = global_topk({p: residual[p].abs() for p in eligible}, k)
    settings = {**dataless_settings(k, exclude), "low_rank": {"rank": rank, "matrices": len(parts)}}
    skill = skill_from_mask(rest, indices, name=name, sparsity=sparsity, method="dataless", settings=settings, **skill_fields)
    return replace(skill, low_rank=parts)

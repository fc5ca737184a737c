"""Dataless localization: a skill is the global top-k of ``|τ|`` over the shared parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from skillbank.errors import TaskVectorError
from skillbank.sparse import check_sparsity, global_top_runs, global_topk, num_selected
from skillbank.storage.format import VALUE_FORMATS
from skillbank.storage.skill import Region, Skill, SkillMetadata
from skillbank.vectors.task_vectors import TaskVector, matches

__all__ = [
    "dataless_settings",
    "eligible_names",
    "localize_dataless",
    "skill_from_mask",
    "skill_from_regions",
    "skill_from_task_vector",
]


def skill_from_mask(tv: TaskVector, indices: Mapping[str, Tensor], **fields: Any) -> Skill:
    """Build a :class:`Skill` from a task vector and chosen flat ``indices`` per parameter; ``fields`` as in
    :func:`skill_from_regions` (``name``, ``sparsity``, ``method``, ``task``, ``settings``, ``metrics``, ``source``,
    ``value_dtype``)."""
    empty = torch.empty(0, dtype=torch.int64, device="cpu")
    regions = {}
    for pname, tau in tv.shared.items():
        idx = indices.get(pname, empty).to("cpu", torch.int64)
        values = tau.reshape(-1)[idx.to(tau.device)] if idx.numel() else torch.empty(0, device="cpu")
        regions[pname] = Region(idx, values.to("cpu", torch.float32))
    return skill_from_task_vector(tv, regions, **fields)


def skill_from_task_vector(
    tv: TaskVector,
    regions: Mapping[str, Region],
    *,
    source: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Skill:
    """:func:`skill_from_regions` with what ``tv`` records (shapes, base fingerprint, dtypes, head, source);
    ``fields`` as there (``name``, ``sparsity``, ``method``, …)."""
    return skill_from_regions(
        regions,
        shapes={p: list(t.shape) for p, t in tv.shared.items()},
        base_fingerprint=tv.base_fingerprint,
        dtypes=tv.dtypes,
        head=tv.head,
        source={**dict(source or {}), **tv.source},  # the task vector knows whether an adapter was merged
        **fields,
    )


def skill_from_regions(
    regions: Mapping[str, Region],
    *,
    shapes: Mapping[str, list[int]],
    base_fingerprint: str,
    dtypes: Mapping[str, str],
    head: Mapping[str, Tensor],
    name: str,
    sparsity: float,
    method: str,
    task: str = "",
    settings: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    source: Mapping[str, Any] | None = None,
    value_dtype: str = "float32",
) -> Skill:
    """Build a :class:`Skill` from its regions (one per shared parameter, in ``shapes``' order) and what it records."""
    if value_dtype not in VALUE_FORMATS:
        raise TaskVectorError(f"value_dtype must be one of {', '.join(VALUE_FORMATS)}, got {value_dtype!r}.")
    metadata = SkillMetadata(
        name=name,
        base_fingerprint=base_fingerprint,
        sparsity=sparsity,
        shapes={p: list(shape) for p, shape in shapes.items()},
        task=task or name,
        method=method,
        settings=dict(settings or {}),
        metrics=dict(metrics or {}),
        source=dict(source or {}),
        value_dtype=value_dtype,
        dtypes=dict(dtypes),
    )
    return Skill(metadata=metadata, regions=dict(regions), head={k: v.to("cpu") for k, v in head.items()})


def localize_dataless(
    tv: TaskVector,
    sparsity: float = 0.01,
    *,
    name: str,
    exclude: Sequence[str] = (),
    block: int = 1,
    **skill_fields: Any,
) -> Skill:
    """The dataless mask: the top ``ceil(s·P)`` entries of ``|τ|`` over all shared parameters.

    Args:
        tv: the task vector.
        sparsity: fraction ``s`` in (0, 1] of the eligible entries to keep.
        name: the skill's name.
        exclude: regexes of parameter names never selected (e.g. ``"embeddings"``);
            ``P`` counts only the eligible entries.
        block: choose whole runs of ``block`` consecutive flat entries (``[j·b, (j + 1)·b)`` of each tensor, the
            last one shorter where ``b`` does not divide it), the fewest runs of largest ``Σ|τ|`` that hold ``k``: a
            skill a :class:`~skillbank.stitching.single_skill.SingleSkillSwitcher` writes run by run, several times
            faster. 1 (default): entries. A measurement, not a recommendation: on the real text tasks runs need
            several times the entries to keep what entries keep (benchmarks/RESULTS.md).
        **skill_fields: ``task``, ``metrics``, ``source``, ``value_dtype``, as in
            :func:`skill_from_mask`.
    """
    check_sparsity(sparsity)
    _check_block(block)
    eligible = {p: tv.shared[p].abs() for p in eligible_names(tv.shared, exclude)}
    k = num_selected(sparsity, sum(t.numel() for t in eligible.values()))
    if block == 1:
        indices = global_topk(eligible, k)
    else:
        indices = global_top_runs(eligible, k, block)
    settings = dataless_settings(sum(int(i.numel()) for i in indices.values()), exclude) | ({"block": block} if block > 1 else {})
    return skill_from_mask(tv, indices, name=name, sparsity=sparsity, method="dataless", settings=settings, **skill_fields)


def _check_block(block: int) -> int:
    """``block`` if it is a whole number >= 1, else a clear error."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise TaskVectorError(f"block must be a whole number >= 1 (1: entries one by one), got {block!r}.")
    return block


def eligible_names(shared: Iterable[str], exclude: Sequence[str]) -> list[str]:
    """The shared parameters a dataless mask may select from (``exclude`` left out); an error if none is left."""
    eligible = [p for p in shared if not matches(p, exclude)]
    if not eligible:
        raise TaskVectorError(f"exclude={list(exclude)} leaves no shared parameter to localize.")
    return eligible


def dataless_settings(k: int, exclude: Sequence[str]) -> dict[str, Any]:
    """What a dataless skill records about how it was chosen."""
    return {"k": k, "exclude": list(exclude), "tie_break": "earliest position"}

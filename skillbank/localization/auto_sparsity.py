"""Skills sized by what they keep: the smallest mask that recovers a target share of the finetune's score.

``sparsity="auto"``: masks are tried on a grid of sizes and each is scored on
validation data with only that skill stitched onto the base (and its own
head); the reference is the full task vector (sparsity 1, i.e. the finetune
itself). Dataless masks cost one top-k each, so the search scans the grid
upwards; learned masks start from a given size (e.g. the dataless choice) and
step down while the target still holds. The choice, its recovery and every
size tried are recorded in the skill's metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor, nn

from skillbank.errors import SkillbankError
from skillbank.localization.localize import localize_dataless
from skillbank.sparse import check_sparsity
from skillbank.stitching.heads import accuracy
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.skill import Skill
from skillbank.vectors.task_vectors import TaskVector

__all__ = ["DEFAULT_GRID", "SizeChoice", "localize_auto", "search_sparsity", "stitched_scorer", "with_choice"]

#: Sizes tried by default, ascending; the last (1.0, the whole task vector) always meets the target.
DEFAULT_GRID: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

Batches = Iterable[Mapping[str, Tensor]]


@dataclass(frozen=True)
class SizeChoice:
    """The outcome of a size search.

    Attributes:
        sparsity: the chosen size.
        recovery: its score over the reference score.
        target: the recovery asked for.
        reference: the score of the whole task vector (the finetune).
        met: whether any size tried reached ``target`` (else ``sparsity`` is the best tried).
        tried: every size tried and its recovery, in the order tried.
    """

    sparsity: float
    recovery: float
    target: float
    reference: float
    met: bool
    tried: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (sizes as strings)."""
        data = asdict(self)
        data["tried"] = {f"{s:g}": r for s, r in self.tried.items()}
        return data


def _check_grid(grid: Sequence[float], target: float) -> list[float]:
    if not 0 < target <= 1.5:
        raise SkillbankError(f"target recovery must be in (0, 1.5], got {target}.")
    sizes = sorted({check_sparsity(float(s)) for s in grid})
    if not sizes:
        raise SkillbankError("the grid of sizes to try is empty.")
    return sizes


def search_sparsity(
    make: Callable[[float], Skill],
    score: Callable[[Skill], float],
    reference: float,
    *,
    target: float = 0.99,
    grid: Sequence[float] = DEFAULT_GRID,
    start: float | None = None,
) -> tuple[Skill, SizeChoice]:
    """The skill of the smallest grid size whose ``score / reference`` reaches ``target``.

    Without ``start`` the grid is scanned upwards and the first size that meets
    the target wins (cheap makers: dataless). With ``start`` (a grid size, e.g.
    the dataless choice for a learned mask) that size is tried first, then the
    search steps down while the target holds, or up until it does, so an
    expensive maker runs as few times as the answer allows. When no size meets
    the target, the best one tried is returned with ``met=False``.

    >>> from skillbank.storage.skill import SkillMetadata
    >>> make = lambda s: Skill(SkillMetadata("t", "fp", s, {}), {})
    >>> skill, choice = search_sparsity(make, lambda k: min(1.0, k.metadata.sparsity * 10), 1.0, target=0.5)
    >>> choice.sparsity, list(choice.tried)
    (0.05, [0.001, 0.002, 0.005, 0.01, 0.02, 0.05])
    """
    sizes = _check_grid(grid, target)
    if not reference > 0:
        raise SkillbankError(f"the reference score must be positive to measure recovery, got {reference}.")
    tried: dict[float, float] = {}
    skills: dict[float, Skill] = {}

    def meets(s: float) -> bool:
        skills[s] = make(s)
        tried[s] = score(skills[s]) / reference
        return tried[s] >= target

    if start is None:
        for s in sizes:
            if meets(s):
                break
    else:
        if start not in sizes:
            raise SkillbankError(f"start size {start} is not on the grid {sizes}.")
        i = sizes.index(start)
        if meets(start):
            while i > 0 and meets(sizes[i - 1]):
                i -= 1
        else:
            while i + 1 < len(sizes) and not meets(sizes[i + 1]):
                i += 1
    passing = [s for s, r in tried.items() if r >= target]
    chosen = min(passing) if passing else max(tried, key=lambda s: (tried[s], -s))
    choice = SizeChoice(chosen, tried[chosen], target, reference, bool(passing), dict(tried))
    return skills[chosen], choice


def with_choice(skill: Skill, choice: SizeChoice) -> Skill:
    """``skill`` with the size search recorded: ``settings["auto"]`` and ``metrics["val_recovery"]``."""
    meta = skill.metadata
    metrics = {**meta.metrics, "val_recovery": choice.recovery}
    settings = {**meta.settings, "auto": choice.to_dict()}
    return replace(skill, metadata=replace(meta, settings=settings, metrics=metrics))


def stitched_scorer(
    model: nn.Module, batches: Batches, metric: Callable[[nn.Module, Batches], float] | None = None
) -> Callable[[Skill], float]:
    """``score(skill)``: ``metric`` (default accuracy) of ``model`` with only ``skill`` stitched and its head in.

    ``model`` must hold the base weights; it holds them again after every call.
    """
    if metric is None:
        metric = accuracy
    plain = Stitcher(model)
    # a skill with low-rank parts composes matrix by matrix; alone, TSV-M gives back its own τ there (made once, if needed)
    spectral = functools.cache(lambda: SpectralStitcher(model, merge="tsv_m"))

    def score(skill: Skill) -> float:
        stitcher = spectral() if skill.low_rank else plain
        stitcher.add(skill)
        try:
            with stitcher.use_head(skill.name) as live:
                return float(metric(live, batches))
        finally:
            stitcher.remove(skill.name)

    return score


def localize_auto(
    tv: TaskVector,
    model: nn.Module,
    validation: Batches | None,
    *,
    name: str,
    target: float = 0.99,
    grid: Sequence[float] = DEFAULT_GRID,
    exclude: Sequence[str] = (),
    reference: float | None = None,
    **skill_fields: Any,
) -> Skill:
    """The dataless skill of the smallest grid size that keeps ``target`` of the finetune's validation accuracy.

    Args:
        tv: the task vector.
        model: a model holding the base weights, with a head the skill's head fits
            (e.g. the base loaded as a sequence classifier); it is returned to the base.
        validation: labelled batches (mappings with ``labels``).
        name: the skill's name.
        target: the recovery to keep, e.g. 0.99.
        grid: the sizes to try.
        exclude: as in :func:`~skillbank.localize_dataless`.
        reference: the finetune's validation accuracy, if known; else measured
            with the whole task vector stitched.
        **skill_fields: as in :func:`~skillbank.localize_dataless`.

    Raises:
        SkillbankError: no validation data was given.
    """
    if validation is None:
        raise SkillbankError(
            "sparsity='auto' needs validation data to measure what a mask keeps: pass a validation "
            "loader (CLI: --val-data), or give a number as the sparsity."
        )
    score = stitched_scorer(model, validation)
    if reference is None:
        reference = score(localize_dataless(tv, 1.0, name=name, exclude=exclude))
    skill, choice = search_sparsity(
        lambda s: localize_dataless(tv, s, name=name, exclude=exclude, **skill_fields), score, reference, target=target, grid=grid
    )
    return with_choice(skill, choice)

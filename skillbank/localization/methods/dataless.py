"""``dataless``: the top ``ceil(s·P)`` entries of ``|τ|`` over all shared parameters (the paper's dataless mask)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skillbank.localization.methods.method import LocalizationInputs, LocalizationMethod

if TYPE_CHECKING:
    from skillbank.localization.spec import LocalizationSpec
    from skillbank.storage.skill import Skill
    from skillbank.vectors.task_vectors import TaskVector

__all__ = ["DatalessMethod"]


class DatalessMethod(LocalizationMethod):
    """Global top-k of ``|τ|``; needs no data. From files it streams (:func:`localize_finetune` chooses).

    >>> DatalessMethod.name
    'dataless'
    """

    name = "dataless"
    summary = "the top s of |tau| over all shared parameters, no data needed (the default)"

    def localize(
        self, tv: TaskVector, sparsity: float, spec: LocalizationSpec, inputs: LocalizationInputs, fields: dict[str, Any]
    ) -> Skill:
        from skillbank.localization.localize import localize_dataless

        if spec.low_rank:
            from skillbank.localization.low_rank import localize_low_rank

            return localize_low_rank(tv, spec.low_rank, sparsity, exclude=spec.exclude, **fields)
        return localize_dataless(tv, sparsity, exclude=spec.exclude, **fields)

"""``learned``: the paper's main method, a mask learned on a few labelled examples with :class:`~skillbank.MaskLearner`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from skillbank.errors import SkillbankError
from skillbank.localization.methods.method import LocalizationInputs, LocalizationMethod

if TYPE_CHECKING:
    from skillbank.localization.spec import LocalizationSpec
    from skillbank.storage.skill import Skill
    from skillbank.vectors.task_vectors import TaskVector

__all__ = ["LearnedMethod"]


class LearnedMethod(LocalizationMethod):
    """Scores over the shared entries trained on ``inputs.few_shot``, starting from the dataless mask; the top-k of
    the trained scores is the mask. ``spec.learner`` says how it trains (``recipe``, ``lr``, ``pool``, …). Learned
    in this process, on a copy of ``inputs.model``.

    >>> LearnedMethod.name
    'learned'
    """

    name = "learned"
    summary = "a mask learned on a few labelled examples (MaskLearner; needs few-shot data)"

    def check(self, inputs: LocalizationInputs) -> None:
        missing = [
            what
            for what, value in (("model", inputs.model), ("few_shot", inputs.few_shot), ("base", inputs.base))
            if value is None
        ]
        if missing:
            raise SkillbankError(
                f"a learned mask needs the finetuned model, the base and a few labelled examples; missing: {', '.join(missing)} "
                "(CLI: --few-shot FILE; SkillHarvester: few_shot=a dataloader)."
            )

    def localize(
        self, tv: TaskVector, sparsity: float, spec: LocalizationSpec, inputs: LocalizationInputs, fields: dict[str, Any]
    ) -> Skill:
        from skillbank.localization.mask_learner import MaskLearner

        self.check(inputs)
        assert inputs.model is not None and inputs.few_shot is not None and inputs.base is not None
        learner = MaskLearner(copy.deepcopy(inputs.model), inputs.base, tv, spec.at(sparsity), task=fields["task"])
        skill = learner.learn(inputs.few_shot, name=fields["name"], time_limit=inputs.time_limit)
        skill.metadata.metrics.update(fields.get("metrics") or {})
        skill.metadata.source.update({**(fields.get("source") or {}), **tv.source})
        return skill

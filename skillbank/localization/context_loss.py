"""The earlier skills' loss on the examples they keep, for a mask learned in context.

A mask learned in context (``MaskLearner(context=...)``) sees the model that holds the earlier skills, but its
objective is the new task's loss alone: nothing stops it from taking entries an earlier task needs. When the
earlier skills keep a few examples (:class:`~skillbank.storage.examples.Examples`), their loss joins the
objective, weighted by ``LearnerSpec.context_weight``; each earlier skill answers its examples through its own
head, in the model holding every skill (the new one through its soft mask). The loss is one of:

- ``"distill"`` (default): KL divergence from the model before the new skill arrived (the earlier skills
  alone, as stitched) to the model with it. It needs no labels: the new mask pays for every answer of an
  earlier task it changes, and a task its finetune barely learned is asked for its own answers back, not for
  accuracy it never had.
- ``"labels"``: cross-entropy with the kept labels.

Each earlier skill counts equally (the mean over skills of the mean loss over its examples), whatever its
number of examples or classes.

>>> CONTEXT_LOSSES
('distill', 'labels')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from skillbank.errors import SkillbankError
from skillbank.stitching.calibration import example_loss, logits_with
from skillbank.stitching.heads import use_head
from skillbank.storage.skill import Skill

__all__ = ["CONTEXT_LOSSES", "ContextExamples"]

#: The losses the earlier skills' examples can be scored with.
CONTEXT_LOSSES = ("distill", "labels")


@dataclass
class ContextExamples:
    """The earlier skills' heads and kept examples, and the loss they are scored with.

    Made by :meth:`of`, which checks that every earlier skill can take part; :meth:`loss` is the term the
    learner adds to its objective.
    """

    loss_kind: str
    heads: list[dict[str, Tensor]]
    batches: list[list[dict[str, Tensor]]]
    _teachers: list[list[Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, context: Sequence[Skill], loss: str = "distill", batch_size: int = 32) -> ContextExamples:
        """Each skill of ``context`` with its head and its examples as batches (on the CPU until used).

        Raises:
            SkillbankError: an unknown loss, no context, an earlier skill without examples or without a head, or
                (``"labels"``) without labels; the message names the skills and how to give them examples.
        """
        if loss not in CONTEXT_LOSSES:
            raise SkillbankError(f"unknown context loss {loss!r}; known: {', '.join(CONTEXT_LOSSES)}.")
        if not context:
            raise SkillbankError("context_weight is set but there is no context: pass the earlier skills as context=.")
        without = sorted(s.name for s in context if s.examples is None)
        if without:
            raise SkillbankError(
                f"context skills {without[:5]} keep no examples, so their loss cannot join the objective: localize "
                "them with --keep-examples N (SkillHarvester(keep_examples=N)), or set context_weight=0."
            )
        headless = sorted(s.name for s in context if not s.head)
        if headless:
            raise SkillbankError(f"context skills {headless[:5]} keep no head to answer their examples with.")
        unlabelled = sorted(s.name for s in context if s.examples is not None and s.examples.labels is None)
        if loss == "labels" and unlabelled:
            raise SkillbankError(f"context skills {unlabelled[:5]} keep unlabelled examples; use the 'distill' loss.")
        return cls(
            loss,
            [dict(s.head) for s in context],
            [s.examples.batches(batch_size) for s in context if s.examples is not None],
        )

    def loss(self, model: nn.Module, weights: Mapping[str, Tensor], before: Callable[[], Mapping[str, Tensor]]) -> Tensor:
        """The mean over earlier skills of their mean loss on their examples, in ``model`` with ``weights``.

        Args:
            model: the learner's model (its other tensors, and each earlier head swapped in, as they are).
            weights: the scored tensors of the model holding every skill (differentiable in the new mask).
            before: the scored tensors before the new skill arrived (the distillation teacher; called once, the
                teacher's answers are kept from then on).
        """
        device = next(iter(weights.values())).device
        if self.loss_kind == "distill" and self._teachers is None:
            self._teachers = []
            with torch.no_grad():
                earlier = {k: v.detach() for k, v in before().items()}
                for head, batches in zip(self.heads, self.batches):
                    with use_head(model, head):
                        self._teachers.append(
                            [torch.log_softmax(logits_with(model, earlier, _on(b, device)).float(), -1) for b in batches]
                        )
        total = torch.zeros((), device=device)
        for i, (head, batches) in enumerate(zip(self.heads, self.batches)):
            count = sum(len(next(iter(b.values()))) for b in batches)
            with use_head(model, head):
                for j, batch in enumerate(batches):
                    batch = _on(batch, device)
                    teacher = self._teachers[i][j] if self._teachers is not None else None
                    value = example_loss(self.loss_kind, logits_with(model, weights, batch), batch.get("labels"), teacher)
                    total = total + value / count
        return total / len(self.heads)


def _on(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}

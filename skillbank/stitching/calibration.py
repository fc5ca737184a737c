"""Weights for each skill's part of a composition, learned on the examples the skills keep (AdaMerging's idea).

A spectral composition (TSV-M) is a sum of per-skill parts in every weight matrix
(:func:`~skillbank.stitching.spectral.tsv_skill_parts`). Calibration weighs each skill's part per layer (or per
skill) so that the composed model answers every skill's kept examples (:class:`~skillbank.storage.examples.Examples`)
through that skill's own head as well as it can. The loss is one of:

- ``"distill"`` (default): KL divergence from the skill alone (the base plus that skill, its head) to the
  composition. It needs no labels, and a task the finetune barely learned asks for its own answers back,
  not for accuracy it never had (a label loss pushes such a skill's weights down).
- ``"labels"``: cross-entropy with the examples' labels.
- ``"entropy"``: the composition's prediction entropy (AdaMerging; no labels, no teacher).

The weights start at 1 (the composition as it is) and take ``steps`` full-batch Adam steps. Deterministic
for the same skills, examples and settings on one device.

>>> layer_group("encoder.layer.3.attention.self.query.weight"), layer_group("pooler.dense.weight")
('encoder.layer.3', 'other')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from skillbank.errors import StitchError
from skillbank.stitching.heads import use_head
from skillbank.storage.examples import Examples

__all__ = ["CALIBRATION_LOSSES", "Calibration", "example_loss", "layer_group", "learn_part_weights", "logits_with"]

#: The losses calibration can learn the weights on.
CALIBRATION_LOSSES = ("distill", "labels", "entropy")


@dataclass(frozen=True)
class Calibration:
    """What calibration learned: one weight per skill and group, and how.

    Attributes:
        groups: the coefficient groups, sorted (layers such as ``encoder.layer.3``, ``other``; or ``all``).
        weights: ``{skill: [weight per group]}``.
        loss, steps, lr: the settings.
        losses: the loss before each step and after the last.
        examples: how many kept examples of each skill it learned on.
    """

    groups: tuple[str, ...]
    weights: dict[str, list[float]]
    loss: str
    steps: int
    lr: float
    losses: list[float]
    examples: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for a model card or metadata."""
        return {**asdict(self), "groups": list(self.groups)}


def layer_group(tensor: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part (``encoder.layer.3``), else ``other``."""
    parts = tensor.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return "other"


def learn_part_weights(
    model: nn.Module,
    base: Mapping[str, Tensor],
    parts: Mapping[str, Mapping[str, Tensor]],
    alone: Callable[[str], Mapping[str, Tensor]] | None,
    heads: Mapping[str, Mapping[str, Tensor]],
    examples: Mapping[str, Examples],
    *,
    loss: str = "distill",
    per: str = "layer",
    steps: int = 30,
    lr: float = 0.02,
    batch_size: int = 32,
) -> tuple[dict[str, Tensor], Calibration]:
    """Learn ``{skill: weight per group}`` for ``base + Σ weight · part`` and return the weighted tensors and the record.

    Args:
        model: the live model (its other tensors as they are stitched); its parameters are not changed.
        base: ``{model tensor name: base value}`` of every tensor in ``parts``.
        parts: ``{skill: {model tensor name: that skill's part}}`` (the parts add up to the composition).
        alone: ``alone(skill)`` gives ``{model tensor name: value}``, the tensors of the base with that skill alone
            (the teacher of ``"distill"``, made one skill at a time; unused otherwise).
        heads: each skill's head.
        examples: each skill's kept examples (every skill of ``parts`` needs some; labels for ``"labels"``).
        loss: ``"distill"``, ``"labels"`` or ``"entropy"``; per: ``"layer"`` or ``"skill"`` (one weight a skill).

    Raises:
        StitchError: an unknown loss or grouping, a skill without examples (or labels), bad step settings.
    """
    _check(parts, examples, loss, per, steps, lr)
    names = sorted(parts)
    group = layer_group if per == "layer" else (lambda _t: "all")
    groups = tuple(sorted({group(t) for p in parts.values() for t in p}))
    index = {g: i for i, g in enumerate(groups)}
    device = next(iter(base.values())).device
    weights = torch.ones(len(names), len(groups), device=device, requires_grad=True)
    batches = {n: [{k: v.to(device) for k, v in b.items()} for b in examples[n].batches(batch_size)] for n in names}
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)  # only the weights learn; the model's own .grad stays untouched
    try:
        teachers = _teachers(model, alone, heads, batches) if loss == "distill" and alone is not None else {}
        optimizer = torch.optim.Adam([weights], lr=lr)
        losses = []
        count = sum(len(b) for b in batches.values())  # batches of all skills: each batch's loss is divided by it
        for step in range(steps + 1):
            optimizer.zero_grad()
            total = 0.0
            params = _weighted(base, parts, names, weights, lambda t: index[group(t)])
            for n in names:
                with use_head(model, heads[n]):
                    for i, batch in enumerate(batches[n]):
                        teacher = teachers[n][i] if teachers else None
                        value = example_loss(loss, logits_with(model, params, batch), batch.get("labels"), teacher) / count
                        if step < steps:
                            value.backward(retain_graph=True)
                        total += float(value.detach())
            losses.append(total)
            if step < steps:
                optimizer.step()
    finally:
        model.train(was_training)
        for parameter in trainable:
            parameter.requires_grad_(True)
    final = weights.detach()
    with torch.no_grad():
        tensors = _weighted(base, parts, names, final, lambda t: index[group(t)])
    record = Calibration(
        groups=groups,
        weights={n: [round(float(x), 6) for x in final[i]] for i, n in enumerate(names)},
        loss=loss,
        steps=steps,
        lr=lr,
        losses=[round(x, 6) for x in losses],
        examples={n: len(examples[n]) for n in names},
    )
    return tensors, record


def _check(
    parts: Mapping[str, Mapping[str, Tensor]], examples: Mapping[str, Examples], loss: str, per: str, steps: int, lr: float
) -> None:
    if loss not in CALIBRATION_LOSSES:
        raise StitchError(f"unknown calibration loss {loss!r}; known: {', '.join(CALIBRATION_LOSSES)}.")
    if per not in ("layer", "skill"):
        raise StitchError(f"calibration weights are per 'layer' or per 'skill', not {per!r}.")
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise StitchError(f"calibration needs steps >= 0 and a positive learning rate, got {steps} and {lr}.")
    if not parts:
        raise StitchError("there is nothing to calibrate: no skill touches a weight matrix.")
    missing = sorted(n for n in parts if n not in examples)
    if missing:
        raise StitchError(
            f"skills {missing[:5]} keep no examples to calibrate on; localize them with --keep-examples N "
            "(SkillHarvester(keep_examples=N)), or leave them out."
        )
    unlabelled = sorted(n for n in parts if examples[n].labels is None)
    if loss == "labels" and unlabelled:
        raise StitchError(f"skills {unlabelled[:5]} keep unlabelled examples; calibrate with loss 'distill' or 'entropy'.")


def _weighted(
    base: Mapping[str, Tensor],
    parts: Mapping[str, Mapping[str, Tensor]],
    names: list[str],
    weights: Tensor,
    column: Callable[[str], int],
) -> dict[str, Tensor]:
    """``base + Σ_i weights[i, group] · part_i`` for every tensor some part covers (in skill-name order)."""
    out: dict[str, Tensor] = {}
    for i, n in enumerate(names):
        for t, part in parts[n].items():
            term = weights[i, column(t)] * part
            out[t] = out[t] + term if t in out else term
    return {t: base[t] + v for t, v in out.items()}


def logits_with(model: nn.Module, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """``model``'s logits on ``batch`` (its ``labels`` left out) with ``params`` in place of its own tensors."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    output = torch.func.functional_call(model, dict(params), args=(), kwargs=inputs)
    logits = getattr(output, "logits", output)
    return logits[0] if isinstance(logits, (tuple, list)) else logits


@torch.no_grad()
def _teachers(
    model: nn.Module,
    alone: Callable[[str], Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
    batches: Mapping[str, list[dict[str, Tensor]]],
) -> dict[str, list[Tensor]]:
    """Each skill's log-probabilities on its own examples with the skill alone (and its head), one skill's
    tensors in memory at a time."""
    out = {}
    for n, skill_batches in batches.items():
        params = alone(n)
        with use_head(model, heads[n]):
            out[n] = [torch.log_softmax(logits_with(model, params, b).float(), -1) for b in skill_batches]
    return out


def example_loss(kind: str, logits: Tensor, labels: Tensor | None, teacher: Tensor | None) -> Tensor:
    """The batch's ``"labels"`` (cross-entropy), ``"distill"`` (KL from the ``teacher``'s log-probabilities) or
    ``"entropy"`` loss, summed over its examples (the caller divides it)."""
    logp = torch.log_softmax(logits.float(), -1)
    if kind == "labels":
        assert labels is not None
        return nn.functional.nll_loss(logp, labels, reduction="sum")
    if kind == "distill":
        assert teacher is not None
        return (teacher.exp() * (teacher - logp)).sum()
    return -(logp.exp() * logp).sum()

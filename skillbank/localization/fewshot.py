"""Class-balanced few-shot subsets: the data a :class:`~skillbank.localization.mask_learner.MaskLearner` learns from,
and the examples a skill keeps (:class:`~skillbank.storage.examples.Examples`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from skillbank.errors import SkillbankError
from skillbank.storage.examples import MAX_EXAMPLES, Examples

__all__ = ["balanced_indices", "examples_from_batches"]


def balanced_indices(labels: Tensor, per_class: int, seed: int = 0) -> list[int]:
    """Up to ``per_class`` seeded random positions of each class in ``labels``, sorted.

    The paper learns each mask on 64 examples per class; a class with fewer
    examples contributes all of them.

    >>> balanced_indices(torch.tensor([0, 1, 0, 1, 1]), 1, seed=0)
    [0, 1]
    """
    if per_class < 1:
        raise SkillbankError(f"per_class must be at least 1, got {per_class}.")
    labels = torch.as_tensor(labels, device="cpu")  # beside the generator
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == label).squeeze(1)
        chosen += positions[torch.randperm(positions.numel(), generator=generator, device="cpu")[:per_class]].tolist()
    return sorted(chosen)


def examples_from_batches(
    batches: Iterable[Mapping[str, Tensor]], per_class: int, *, seed: int = 0, pad_token_id: int = 0
) -> Examples:
    """Up to ``per_class`` seeded examples of each label from tokenized ``batches`` (``labels`` required), padded to one
    width: what ``skillbank localize --keep-examples`` and ``SkillHarvester(keep_examples=...)`` store.

    Padding: ``attention_mask`` and ``token_type_ids`` with 0, every other input with ``pad_token_id``.
    """
    rows: list[dict[str, Tensor]] = []
    for batch in batches:
        if "labels" not in batch:
            raise SkillbankError("examples to keep need labels; the batches have none.")
        names = [k for k, v in batch.items() if isinstance(v, Tensor) and v.dim() == 2 and not v.is_floating_point()]
        for i in range(len(batch["labels"])):
            rows.append({**{k: batch[k][i] for k in names}, "labels": batch["labels"][i]})
    if not rows:
        raise SkillbankError("there are no examples to keep: the batches are empty.")
    chosen = balanced_indices(torch.stack([r["labels"] for r in rows]), per_class, seed=seed)
    if len(chosen) > MAX_EXAMPLES:
        raise SkillbankError(f"{len(chosen)} examples to keep; a skill keeps at most {MAX_EXAMPLES} (fewer a class).")
    width = max(int(rows[i]["input_ids" if "input_ids" in rows[i] else next(iter(rows[i]))].shape[0]) for i in chosen)
    inputs: dict[str, Tensor] = {}
    for name in (k for k in rows[chosen[0]] if k != "labels"):
        fill = 0 if name in ("attention_mask", "token_type_ids") else pad_token_id
        out = torch.full((len(chosen), width), fill, dtype=torch.int64, device="cpu")
        for j, i in enumerate(chosen):
            row = rows[i][name]
            out[j, : row.shape[0]] = row
        inputs[name] = out
    return Examples(inputs, torch.stack([rows[i]["labels"] for i in chosen]))

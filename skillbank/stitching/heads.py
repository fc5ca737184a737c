"""Per-task heads: evaluate a stitched model with one skill's own head swapped in, e.g. by its accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from skillbank.errors import StitchError
from skillbank.vectors.weights import align_names

__all__ = ["accuracy", "use_head"]


@contextmanager
def use_head(model: nn.Module, head: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Swap ``head``'s tensors into ``model`` for the block, then restore the old ones.

    The head tensors replace the parameters' storage, so a head with another
    shape (a task with more labels) works too. The model's own tensors come
    back exactly as they were.

    Raises:
        StitchError: the model holds no tensor for some head entry.
    """
    tensors = dict(model.state_dict(keep_vars=True))
    names = align_names(head, tensors)
    missing = sorted(set(head) - set(names))
    if missing:
        raise StitchError(f"the model has no tensor for head entries {missing[:5]}; is it the right architecture?")
    saved = {}
    with torch.no_grad():
        for src, dst in names.items():
            target = tensors[dst]
            saved[dst] = target.data
            target.data = head[src].to(device=target.device, dtype=target.dtype)
    try:
        yield model
    finally:
        for dst, data in saved.items():
            tensors[dst].data = data


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Fraction of correct argmax predictions of ``model`` over labelled ``batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)

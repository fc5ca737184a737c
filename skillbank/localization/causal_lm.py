"""Causal language models as skills: what differs from a classifier.

A finetuned decoder (``AutoModelForCausalLM``: Llama, GPT-2, …) becomes a skill
like any model; three things differ, and live here:

* the loss is the next-token loss over the batch's ``labels``; a batch without
  them gets ``input_ids`` as labels with padding (``attention_mask == 0``) set
  to ``-100``, so padding never counts (:func:`with_lm_labels`);
* the validation metric is next-token accuracy over the same positions
  (:class:`NextTokenAccuracy`);
* tied input embeddings and LM head (GPT-2) are one tensor under two names:
  task vectors keep the first name only (:func:`skillbank.vectors.weights.drop_aliases`),
  so a skill never holds the same entry twice. The paper's language setting
  leaves embeddings and the LM head out of the mask: pass ``exclude=LM_EXCLUDE``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["LM_EXCLUDE", "NextTokenAccuracy", "is_causal_lm", "with_lm_labels"]

#: Regexes of the token and position embeddings and the LM head of common decoders (Llama, Mistral, GPT-2,
#: GPT-NeoX, OPT, Falcon…): ``exclude=LM_EXCLUDE`` keeps them out of a mask, as the paper does for language models.
LM_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(embed_tokens|embed_positions|embed_in|wte|wpe|word_embeddings)\.",
    r"(^|\.)(lm_head|embed_out)\.",
)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (``…ForCausalLM``, ``…LMHeadModel``)."""
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)


def with_lm_labels(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with ``labels``: its own when present, else ``input_ids`` with padding set to ``-100``."""
    out = dict(batch)
    if "labels" not in out:
        labels = out["input_ids"].clone()
        if "attention_mask" in out:
            labels = labels.masked_fill(out["attention_mask"] == 0, -100)
        out["labels"] = labels
    return out


class NextTokenAccuracy(Metric):
    """Share of positions whose next token is predicted right, over labels other than ``-100``.

    ``update(logits, labels)`` with logits ``[batch, time, vocab]`` and labels
    ``[batch, time]`` shifted as the model's own loss shifts them.
    """

    full_state_update = False
    correct: Tensor  # states made by add_state
    total: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0, device="cpu"), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, device="cpu"), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        counted = target != -100
        self.correct += (predicted.eq(target) & counted).sum()
        self.total += counted.sum()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp_min(1)

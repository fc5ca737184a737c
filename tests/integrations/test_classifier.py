"""SequenceClassifier: gradient clipping of its own, overridden by the Trainer's; bad settings refused."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.models import live_copy
from skillbank.errors import SkillbankError
from skillbank.integrations.classifier import SequenceClassifier
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset


def one_step(module: SequenceClassifier, **trainer_args) -> float:
    """The norm of the parameter change of one SGD step (lr 1, momentum 0.9: the first step moves by the gradient)."""
    before = [p.detach().clone() for p in module.parameters()]
    ids, labels = DEMO_TASKS[0].sample(16, torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    trainer.fit(module, DataLoader(TokenDataset(ids, labels), batch_size=16))
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(module.parameters(), before))))


def test_gradient_clip_val_bounds_the_step_and_the_trainers_setting_wins(base_model):
    model = live_copy(base_model)
    free = one_step(SequenceClassifier(copy.deepcopy(model), 2, lr=1.0, optimizer="sgd"))
    clipped = one_step(SequenceClassifier(copy.deepcopy(model), 2, lr=1.0, optimizer="sgd", gradient_clip_val=1e-3))
    assert free > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)
    trainers = one_step(
        SequenceClassifier(copy.deepcopy(model), 2, lr=1.0, optimizer="sgd", gradient_clip_val=1e-3), gradient_clip_val=1e-4
    )
    assert trainers == pytest.approx(1e-4, rel=1e-3)


def test_a_non_positive_clip_is_refused(base_model):
    with pytest.raises(SkillbankError, match="gradient_clip_val must be > 0"):
        SequenceClassifier(live_copy(base_model), 2, gradient_clip_val=0.0)

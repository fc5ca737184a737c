"""Small LightningModules and data for the callback tests (imported by the tests and the DDP child script)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from skillbank.callbacks import SkillStitcher
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset


def task_loader(n: int = 128, batch_size: int = 16, seed: int = 0, task: int = 0) -> DataLoader:
    ids, labels = DEMO_TASKS[task].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=batch_size)


class Watcher(pl.LightningModule):
    """A long-running module whose backbone is frozen (only a dummy scalar trains): what SkillStitcher serves."""

    def __init__(self, model: BertForSequenceClassification) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen_heads: list[list[str]] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return (self.dummy - 1.0).pow(2).sum()

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.seen_heads.append(sorted(SkillStitcher.find(self.trainer).heads))

    def predict_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self.model(input_ids=batch["input_ids"]).logits

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD([self.dummy], lr=0.1)


def quiet_trainer(**overrides) -> pl.Trainer:
    """A CPU Trainer without logs or bars, writing (a harvest's saved finetune, checkpoints) into a fresh temporary
    folder, never into the working directory."""
    import tempfile

    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="skillbank-test-run-"),
    )
    settings.update(overrides)
    return pl.Trainer(**settings)

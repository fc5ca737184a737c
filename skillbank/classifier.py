"""A minimal LightningModule for finetuning a Hugging Face sequence classifier, and its evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["SequenceClassifier", "accuracy"]


class SequenceClassifier(pl.LightningModule):
    """Finetunes ``model`` (any module taking ``**batch`` with ``labels`` and returning ``.loss``/``.logits``).

    Args:
        model: e.g. a ``BertForSequenceClassification``; kept as ``self.model``.
        num_labels: number of classes, for the validation accuracy.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adamw"``, or ``"sgd"`` (momentum 0.9). SGD keeps the task
            vector proportional to the accumulated gradient, which concentrates
            it on the parameters that matter; Adam's normalized steps spread it
            evenly, so dataless top-|τ| masks localize SGD finetunes far better.
    """

    def __init__(
        self, model: nn.Module, num_labels: int, lr: float = 1e-3, weight_decay: float = 0.0, optimizer: str = "adamw"
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def forward(self, **batch: Tensor) -> object:
        return self.model(**batch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.val_acc(out.logits.argmax(-1), batch["labels"])
        self.log("val_loss", out.loss, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


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

"""A minimal LightningModule for finetuning a Hugging Face sequence classifier, and its evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from skillbank.errors import SkillbankError
from skillbank.sharding import is_sharded, shard_model
from skillbank.stitching.heads import use_head
from skillbank.vectors.models import load_model

__all__ = ["SequenceClassifier"]


class SequenceClassifier(pl.LightningModule):
    """Finetunes ``model`` (any module taking ``**batch`` with ``labels`` and returning ``.loss``/``.logits``).

    Args:
        model: e.g. a ``BertForSequenceClassification``, or a local Hugging Face
            folder loaded as one with ``num_labels`` classes; kept as ``self.model``.
        num_labels: number of classes, for the validation accuracy.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adamw"``, or ``"sgd"`` (momentum 0.9). SGD keeps the task
            vector proportional to the accumulated gradient, which concentrates
            it on the parameters that matter; Adam's normalized steps spread it
            evenly, so dataless top-|τ| masks localize SGD finetunes far better.
        skill_head: evaluate with this skill's head, stitched by the trainer's
            :class:`~skillbank.callbacks.SkillStitcher`, instead of the model's own.
        gradient_clip_val: clip the gradients' global norm to this before each step
            (unless the Trainer's own ``gradient_clip_val`` is set, which wins). SGD
            finetunes of real tasks at lr 1e-2 collapse to one class without it; the
            recipes use 1.0 with SGD.
    """

    def __init__(
        self,
        model: nn.Module | str,
        num_labels: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        skill_head: str | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise SkillbankError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise SkillbankError(f"gradient_clip_val must be > 0 (or None: no clipping), got {gradient_clip_val}.")
        self.gradient_clip_val = gradient_clip_val
        self.model = load_model(model, num_labels)
        self.skill_head = skill_head
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard the model block by block over the data-parallel ranks
        (:func:`~skillbank.sharding.shard_model`); any other strategy keeps it whole."""
        if self.device_mesh is not None and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh)

    def forward(self, **batch: Tensor) -> object:
        return self.model(**batch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if self.skill_head is None:
            out = self.model(**batch)
        else:
            from skillbank.callbacks import SkillStitcher

            heads = SkillStitcher.find(self.trainer).heads
            if self.skill_head not in heads:
                raise SkillbankError(f"skill {self.skill_head!r} is not stitched (stitched: {sorted(heads) or 'none'}).")
            with use_head(self.model, heads[self.skill_head]) as model:
                out = model(**batch)
        self.val_acc(out.logits.argmax(-1), batch["labels"])
        self.log("val_loss", out.loss, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """The Trainer's clipping when it sets one, else ``gradient_clip_val`` (by norm)."""
        if gradient_clip_val is None and self.gradient_clip_val is not None:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip_val, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

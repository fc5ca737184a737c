"""Small synthetic text-classification tasks for the demo, the tests and the examples.

Sequences of filler tokens with task keywords mixed in, like keyword-driven
real tasks (sentiment words, topic words, spam words): each task's skill
lives mostly in its own keywords' embeddings and the attention reading them,
so skills overlap little, as in the paper's text tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from skillbank.errors import SkillbankError
from skillbank.localization.fewshot import balanced_indices

__all__ = ["DEMO_TASKS", "PRETEXT_TASK", "DemoTaskData", "SyntheticTask", "TokenDataset", "make_splits"]

VOCAB_SIZE = 64
SEQ_LEN = 16
_FILLER = (30, VOCAB_SIZE)  # tokens 30..63 carry no label information; 0 is padding, 1 is [CLS]


@dataclass(frozen=True)
class SyntheticTask:
    """A task: ``groups[c]`` are the keywords of class ``c``; a sequence's label is the class with most keywords."""

    name: str
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_labels(self) -> int:
        return len(self.groups)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` sequences of token ids and their labels."""
        ids = torch.randint(*_FILLER, (n, SEQ_LEN), generator=generator, device=generator.device)
        ids[:, 0] = 1
        labels = torch.randint(0, self.num_labels, (n,), generator=generator, device=generator.device)
        for row in range(n):
            label = int(labels[row])
            positions = torch.randperm(SEQ_LEN - 1, generator=generator, device=generator.device)[:5] + 1
            winner = int(torch.randint(2, 4, (1,), generator=generator, device=generator.device))
            keywords = [self._pick(label, generator) for _ in range(winner)]
            if self.num_labels > 1:
                other = (
                    label + 1 + int(torch.randint(0, self.num_labels - 1, (1,), generator=generator, device=generator.device))
                ) % self.num_labels
                keywords += [self._pick(other, generator) for _ in range(winner - 1)]
            for pos, token in zip(positions.tolist(), keywords):
                ids[row, pos] = token
        return ids, labels

    def _pick(self, label: int, generator: torch.Generator) -> int:
        group = self.groups[label]
        return group[int(torch.randint(0, len(group), (1,), generator=generator, device=generator.device))]


#: The demo's three tasks, with disjoint keywords.
DEMO_TASKS = (
    SyntheticTask("sentiment", ((2, 3, 4), (5, 6, 7))),
    SyntheticTask("topic", ((8, 9), (10, 11), (12, 13), (14, 15))),
    SyntheticTask("urgency", ((16, 17, 18), (19, 20, 21), (22, 23, 24))),
)


#: Pretraining task for the demo's base model, on keywords no demo task uses: the
#: base learns to carry keyword evidence to [CLS], and each finetune then mostly
#: has to map its own keywords, a small region, as with real pretrained models.
PRETEXT_TASK = SyntheticTask("pretext", ((25,), (26,), (27,), (28,), (29,)))


class TokenDataset(Dataset):
    """``{"input_ids", "attention_mask", "labels"}`` items from token ids and labels."""

    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def make_splits(
    task: SyntheticTask, sizes: tuple[int, int, int] = (2000, 500, 500), seed: int = 0, batch_size: int = 64
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Seeded train / validation / test loaders for ``task``."""
    generator = torch.Generator().manual_seed(seed)
    loaders = []
    for split, n in enumerate(sizes):
        ids, labels = task.sample(n, generator)
        loaders.append(
            DataLoader(
                TokenDataset(ids, labels),
                batch_size=batch_size,
                shuffle=split == 0,
                generator=torch.Generator().manual_seed(seed),
            )
        )
    return loaders[0], loaders[1], loaders[2]


class DemoTaskData(pl.LightningDataModule):
    """One demo task as a LightningDataModule, with the same splits as ``skillbank demo --seed``.

    Args:
        task: a name from :data:`DEMO_TASKS`.
        shots_per_class: train on this many examples per class (class-balanced,
            seeded), e.g. 64 for mask learning; ``None`` for the whole train split.
        seed: the demo's seed (task ``i`` uses ``seed + i``, as the demo does).
        batch_size: batch size of every loader.
    """

    def __init__(self, task: str = "sentiment", shots_per_class: int | None = None, seed: int = 0, batch_size: int = 32) -> None:
        super().__init__()
        names = [t.name for t in DEMO_TASKS]
        if task not in names:
            raise SkillbankError(f"unknown demo task {task!r}; choose one of {names}.")
        self.task, self.index = DEMO_TASKS[names.index(task)], names.index(task)
        self.shots_per_class, self.seed, self.batch_size = shots_per_class, seed, batch_size

    def setup(self, stage: str | None = None) -> None:
        train, val, test = make_splits(self.task, seed=self.seed + self.index, batch_size=self.batch_size)
        train_set: Dataset = train.dataset
        if self.shots_per_class is not None:
            assert isinstance(train_set, TokenDataset)
            train_set = Subset(train_set, balanced_indices(train_set.labels, self.shots_per_class, seed=self.seed))
        self.train_set, self.val_set, self.test_set = train_set, val.dataset, test.dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)

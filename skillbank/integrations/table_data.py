"""``TextClassificationData``: your own labelled texts (CSV, TSV or JSON lines) as a LightningDataModule.

``skillbank fit --config configs/finetune_my_data.yaml --data.path my.csv`` goes from a
file to a banked skill with no Python: named text and label columns, labels as
integers or as names (numbered in sorted order), seeded train/validation/test splits.
"""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from skillbank.errors import SkillbankError
from skillbank.integrations.labelled_text import TextSplit, json_lines, task_loader
from skillbank.integrations.pulled.wheels import resolve_model
from skillbank.localization.fewshot import balanced_indices
from skillbank.vectors.models import load_tokenizer

__all__ = ["MAX_TABLE_BYTES", "TextClassificationData", "read_table"]

#: The largest file read (a wrong path must not fill memory).
MAX_TABLE_BYTES = 1 << 30
#: The most classes a file's labels may make (a new head has one row per class; more is a wrong column).
MAX_LABELS = 10_000
_CLASS_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²" is a digit to str.isdigit, not to int()


def read_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> tuple[TextSplit, list[str]]:
    """Texts and integer labels from a ``.csv``, ``.tsv`` or ``.jsonl`` file, and the label names.

    Labels that are all class numbers (``0``, ``1``, … as ASCII digits) are kept (names
    ``"0"``, ``"1"``, …); otherwise each distinct label is numbered in sorted order.
    Linear in the rows; at most :data:`MAX_LABELS` classes.

    Raises:
        SkillbankError: a missing, too large or empty file, an unknown extension, a
            missing column, a row with more fields than the header, a row without text
            or label (named by its line), or more classes than :data:`MAX_LABELS`.
    """
    path = Path(path)
    if not path.is_file():
        raise SkillbankError(
            f"{path} is not a file; give a .csv, .tsv or .jsonl file with {text_column!r} and {label_column!r} columns."
        )
    kind = path.suffix.lower()
    if kind not in (".csv", ".tsv", ".jsonl"):
        raise SkillbankError(f"{path}: unknown kind {kind!r}; use .csv, .tsv or .jsonl.")
    with path.open("rb") as f:
        data = f.read(MAX_TABLE_BYTES + 1)
    if len(data) > MAX_TABLE_BYTES:
        raise SkillbankError(f"{path} is larger than {MAX_TABLE_BYTES >> 20} MiB.")
    text = data.decode("utf-8-sig", errors="replace")
    rows = (
        json_lines(path, text, "a JSON object per line")
        if kind == ".jsonl"
        else _delimited_rows(path, text, "\t" if kind == ".tsv" else ",")
    )
    texts, raw = [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise SkillbankError(
                    f"{path}:{line}: no {column!r} column (columns: {sorted(row)[:10]}); "
                    "name yours with text_column= / label_column= (--data.text_column ...)."
                )
        if None in row:  # csv.DictReader's key for fields past the header's
            raise SkillbankError(
                f"{path}:{line}: more fields than the header's {len(row) - 1} columns; quote texts that hold a "
                f'{"tab" if kind == ".tsv" else "comma"} ("like, this").'
            )
        if not isinstance(row[text_column], str) or row[label_column] in ("", None):
            raise SkillbankError(f"{path}:{line}: the text must be a string and the label not empty.")
        texts.append(row[text_column])
        raw.append(str(row[label_column]).strip())
    if not texts:
        raise SkillbankError(f"{path} holds no examples.")
    if all(_CLASS_NUMBER.fullmatch(r) for r in raw):
        labels = [int(r) for r in raw]
        if max(labels) >= MAX_LABELS:
            raise SkillbankError(
                f"{path}: label {max(labels)} is a class number past {MAX_LABELS - 1}; number the classes "
                f"0..K-1, or give them names."
            )
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted(set(raw))
        if len(names) > MAX_LABELS:
            raise SkillbankError(
                f"{path}: {len(names):,} distinct labels in {label_column!r}, more than {MAX_LABELS:,} classes; "
                "is that the right column (--data.label_column)?"
            )
        number = {name: i for i, name in enumerate(names)}
        labels = [number[r] for r in raw]
    return TextSplit(tuple(texts), tuple(labels)), names


def _delimited_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise SkillbankError(f"{path}:{reader.line_num}: {exc}.") from None


class TextClassificationData(pl.LightningDataModule):
    """Tokenized train/validation/test loaders of your own labelled texts.

    Args:
        path: a ``.csv``, ``.tsv`` or ``.jsonl`` file (see :func:`read_table`).
        tokenizer: a local tokenizer folder (e.g. the base model's), or a pulled model's alias.
        text_column, label_column: the columns holding the text and the label.
        val_fraction, test_fraction: shares of the rows held out (a seeded split).
        shots_per_class: train on this many class-balanced examples per class (e.g. 64
            for mask learning); ``None`` for the whole train split.
        max_length: tokens per text.
        batch_size: batch size of every loader.
        seed: seeds the split, the few-shot choice and the shuffling.

    Where the splits come from is one method, :meth:`read_splits` (and :meth:`eval_indices`, which
    examples an evaluation loader serves): :class:`~skillbank.integrations.pulled.data.TextTaskData`
    serves a real task's fixed splits by overriding them, and shares everything else.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str = "pulled:minilm",
        text_column: str = "text",
        label_column: str = "label",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        shots_per_class: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise SkillbankError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and leave rows to train on."
            )
        self.path, self.tokenizer_source = path, tokenizer
        self.text_column, self.label_column = text_column, label_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.shots_per_class, self.max_length, self.batch_size, self.seed = shots_per_class, max_length, batch_size, seed
        self.splits: dict[str, TextSplit] = {}
        self.label_names: list[str] = []
        self.cache: Path | None = None  # where pulled models live (None: $SKILLBANK_CACHE or ~/.cache/skillbank)

    # -- where the splits come from: what a subclass (TextTaskData) changes ------------------------------------

    def read_splits(self) -> tuple[dict[str, TextSplit], list[str]]:
        """The ``train``, ``validation`` and ``test`` splits and the label names: here, the file split by ``seed``."""
        rows, names = read_table(self.path, self.text_column, self.label_column)
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        n_val, n_test = round(self.val_fraction * len(rows)), round(self.test_fraction * len(rows))
        parts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        splits = {
            name: TextSplit(tuple(rows.texts[i] for i in sorted(part)), tuple(rows.labels[i] for i in sorted(part)))
            for name, part in parts.items()
        }
        return splits, names

    def eval_indices(self, name: str, split: TextSplit) -> list[int] | None:
        """The examples of the ``validation`` or ``test`` split its loader serves (``None``: all of them)."""
        return None

    @property
    def source(self) -> str:
        """The data, in words, for messages."""
        return str(self.path)

    # -- the DataModule -------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        """How many classes the data's labels make."""
        if not self.label_names:
            self.label_names = self.read_splits()[1]
        return len(self.label_names)

    def prepare_data(self) -> None:
        """Pull the tokenizer's model if it is a ``pulled:`` alias (Lightning calls this on one process per node)."""
        resolve_model(self.tokenizer_source, self.cache)

    def setup(self, stage: str | None = None) -> None:
        self.splits, self.label_names = self.read_splits()
        self.tokenizer = load_tokenizer(str(resolve_model(self.tokenizer_source, self.cache)))

    def _split(self, name: str) -> TextSplit:
        if name not in self.splits:
            raise SkillbankError(f"{type(self).__name__} has no data yet: call setup() first (the Trainer does).")
        if not len(self.splits[name]):
            raise SkillbankError(f"the {name} split of {self.source} is empty; raise its fraction or add rows.")
        return self.splits[name]

    def _loader(self, name: str, indices: list[int] | None = None, shuffle: bool = False) -> DataLoader:
        return task_loader(
            self._split(name),
            self.tokenizer,
            max_length=self.max_length,
            batch_size=self.batch_size,
            shuffle=shuffle,
            indices=indices,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        indices = None
        if self.shots_per_class is not None:
            labels = torch.tensor(self._split("train").labels, device="cpu")
            indices = balanced_indices(labels, self.shots_per_class, seed=self.seed)
        return self._loader("train", indices, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_indices("validation", self._split("validation")))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_indices("test", self._split("test")))

"""A user's own labelled texts: JSON lines read with bounds (e.g. the validation data of ``--sparsity auto``), and batched."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from skillbank.errors import SkillbankError

__all__ = ["MAX_BYTES", "TextSplit", "json_lines", "read_jsonl", "task_loader"]

#: The largest file read (validation sets are small; this keeps a wrong path from filling memory).
MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TextSplit:
    """Texts with integer labels."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


def read_jsonl(path: str | Path, num_labels: int | None = None) -> TextSplit:
    """Texts and labels from ``path``: one JSON object a line, ``{"text": "...", "label": 0}``.

    Args:
        path: the file.
        num_labels: when given, every label must be in ``range(num_labels)``.

    Raises:
        SkillbankError: the file is missing, too large, empty, or a line is not such an object.
    """
    path = Path(path)
    if not path.is_file():
        raise SkillbankError(f'{path} is not a file; give a JSON-lines file of {{"text": ..., "label": ...}} objects.')
    with path.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise SkillbankError(
            f"{path} is larger than {MAX_BYTES // 2**20} MiB; a validation set of a few hundred examples is enough."
        )
    texts, labels = [], []
    expected = '{"text": <string>, "label": <integer>}'
    for number, row in json_lines(path, data.decode("utf-8", errors="replace"), expected):
        if not (isinstance(row.get("text"), str) and type(row.get("label")) is int):
            raise SkillbankError(f"{path}:{number}: expected {expected}.")
        if row["label"] < 0 or (num_labels is not None and row["label"] >= num_labels):
            raise SkillbankError(
                f"{path}:{number}: label {row['label']} is outside 0..{(num_labels or 1) - 1} (the finetuned model's classes)."
            )
        texts.append(row["text"])
        labels.append(row["label"])
    if not texts:
        raise SkillbankError(f"{path} holds no examples.")
    return TextSplit(tuple(texts), tuple(labels))


def json_lines(path: Path, text: str, expected: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``text`` (the contents of ``path``), each a JSON object.

    Raises:
        SkillbankError: a line is not JSON, or (saying ``expected``) not an object; named by its line.
    """
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SkillbankError(f"{path}:{number}: not JSON ({str(exc)[:60]}).") from None
        if not isinstance(row, dict):
            raise SkillbankError(f"{path}:{number}: expected {expected}.")
        rows.append((number, row))
    return rows


# -- tokenized loaders ---------------------------------------------------------


class _Encoded(Dataset):
    def __init__(self, encodings: dict[str, list], labels: Sequence[int]) -> None:
        self.encodings, self.labels = encodings, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def task_loader(
    split: TextSplit,
    tokenizer: Any,  # any Hugging Face tokenizer
    *,
    max_length: int = 128,
    batch_size: int = 32,
    shuffle: bool = False,
    indices: Sequence[int] | None = None,
    seed: int = 0,
) -> DataLoader:
    """Batches of ``input_ids``/``attention_mask``/``labels``, padded per batch (``DataCollatorWithPadding``)."""
    import torch
    from transformers import DataCollatorWithPadding

    rows = range(len(split)) if indices is None else indices
    texts = [split.texts[i] for i in rows]
    encodings = dict(tokenizer(texts, truncation=True, max_length=max_length))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        _Encoded(encodings, [split.labels[i] for i in rows]),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )

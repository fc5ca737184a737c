"""A user's own labelled texts (JSON lines), read with bounds, e.g. the validation data of ``--sparsity auto``."""

from __future__ import annotations

import json
from pathlib import Path

from skillbank.errors import SkillbankError
from skillbank.text_tasks import TextSplit

__all__ = ["MAX_BYTES", "json_lines", "read_jsonl"]

#: The largest file read (validation sets are small; this keeps a wrong path from filling memory).
MAX_BYTES = 64 * 2**20


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

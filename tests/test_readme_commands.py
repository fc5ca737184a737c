"""The README's command table, run in order right after its set-up line, in a fresh working folder (issue 28).

A newcomer runs ``skillbank demo`` in a fresh clone and then the table's rows, top to bottom, as
written: every row must work there, on the folders the demo and the rows before it left. Only
training lengths are shortened (by the commands' own flags), and ``pulled:minilm`` is a tiny
stand-in already in the cache (nothing is downloaded). The table and this walk must name the
same commands: a row added to the README without a step here fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers.models import REVIEW_WORDS, own_data
from skillbank import SkillBank
from skillbank.integrations.cli import main

ROOT = Path(__file__).parents[1]
SHORT = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def table_commands() -> list[str]:
    """The command of each row of the README's "From the shell" table, in order (``localize --replace`` as its own)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("From the shell", 1)[1].split("\n\n", 2)[1]
    commands = []
    for row in table.splitlines()[2:]:
        words = re.match(r"\| `skillbank ([a-z-]+)( [^`]*)?`", row)
        assert words, row
        commands.append(words.group(1) + (" --replace" if "--replace" in (words.group(2) or "") else ""))
    return commands


@pytest.mark.slow
def test_every_row_of_the_command_table_runs_in_order_after_the_setup(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    own_data(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a fresh clone: configs/, the user's my.csv, nothing else
    ran: list[str] = []

    def run(*argv: str, code: int = 0) -> str:
        ran.append(argv[0] + (" --replace" if "--replace" in argv else ""))
        assert main(list(argv)) == code, (argv, capsys.readouterr())
        return capsys.readouterr().out

    demo = "skillbank-demo"
    run("demo")  # the README's first line, as written
    assert SkillBank(f"{demo}/bank").names() == ["sentiment", "topic", "urgency"]
    run("fit", "--config", "configs/mask_demo.yaml", "--trainer.max_epochs", "2", *SHORT)
    run(
        "fit",
        "--config",
        "configs/finetune_harvest.yaml",
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "20",
        *SHORT,
    )
    assert SkillBank(f"{demo}/bank").names()[-2:] == ["sentiment-learned", "topic-harvested"]
    run(
        "fit",
        "--config",
        "configs/finetune_my_data.yaml",
        "--data.path",
        "my.csv",
        "--data.text_column",
        "review",
        "--data.label_column",
        "verdict",
        "--model.init_args.num_labels",
        "2",
        "--model.init_args.lr",
        "0.01",
        "--trainer.max_epochs",
        "2",
        *SHORT,
    )
    assert SkillBank("my-bank").names() == ["my-task"] and Path("my-runs/finetuned/my-task/config.json").is_file()
    run("validate", "--config", "configs/serve_stitch.yaml", *SHORT)
    validation = [{"text": f"the film was {w} {w}", "label": int(w in REVIEW_WORDS[:3])} for w in REVIEW_WORDS[:6]]
    Path("val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    localized = run(
        "localize",
        "--base",
        "pulled:minilm",
        "--finetuned",
        "my-runs/finetuned/my-task",
        "--bank",
        "my-bank",
        "--name",
        "reviews",
        "--sparsity",
        "auto",
        "--val-data",
        "val.jsonl",
        "--routing-data",
        "val.jsonl",
        "--keep-examples",
        "2",
    )
    assert "routing: 2 centroids" in localized and "keeps the target" in localized
    assert "examples: 4 examples, 2 classes" in localized
    run(
        "localize",
        "--base",
        f"{demo}/base",
        "--finetuned",
        f"{demo}/finetuned/topic",
        "--bank",
        f"{demo}/bank",
        "--name",
        "topic-2",
    )
    assert "-> reviews" in run(
        "route", "my-bank", "--base", "pulled:minilm", "--text", "the film was good", "--skills", "reviews"
    )
    assert "topic-2" in run("list", f"{demo}/bank")
    assert json.loads(run("show", f"{demo}/bank", "topic", "--json"))["entry"]["name"] == "topic"
    assert "mask overlap" in run("diff", f"{demo}/bank", "topic", "topic-2")
    run("remove", f"{demo}/bank", "topic-2")
    assert "dropped 4 examples from 'reviews'" in run("drop-examples", "my-bank", "reviews")
    assert "all 5 skills ok" in run("verify", f"{demo}/bank")
    assert "nothing to remove" in run("gc", f"{demo}/bank")
    run("stitch", "--base", f"{demo}/base", "--bank", f"{demo}/bank", "--skills", "sentiment,topic", "--out", "stitched")
    assert Path("stitched/model.safetensors").is_file()
    run("export", f"{demo}/bank", "topic", "--base", f"{demo}/base", "--out", "topic-model")
    assert Path("topic-model/config.json").is_file()
    assert "pulled:minilm ->" in run("pull", "minilm")  # already in the cache: nothing fetched
    run("plot", "overlap", f"{demo}/bank", "--out", "overlap.png")
    run("plot", "layers", f"{demo}/bank", "--out", "layers.png")
    run(
        "localize",
        "--base",
        f"{demo}/base",
        "--finetuned",
        f"{demo}/finetuned/topic",
        "--bank",
        f"{demo}/bank",
        "--name",
        "topic",
        "--sparsity",
        "0.02",
        "--replace",
    )
    run("tag", f"{demo}/bank", "topic", "prod", "--note", "the 2% version")
    run("report", f"{demo}/bank", "--out", "report.html")
    assert Path("report.html").is_file() and Path("overlap.png").is_file()

    table = table_commands()
    done = list(dict.fromkeys(ran))
    assert [c for c in done if c in table] == list(dict.fromkeys(table)), "run the README's rows in the table's order"
    assert set(table) <= set(done), f"rows of the README's table this walk does not run: {set(table) - set(done)}"

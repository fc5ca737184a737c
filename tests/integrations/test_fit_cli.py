"""``skillbank fit``: the shipped LightningCLI configs parse, print and run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertModel

from helpers.models import finetune_like, tiny_config
from skillbank import SkillBank, SkillbankError
from skillbank.integrations.cli import main

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture
def demo_like(tmp_path: Path) -> dict[str, str]:
    """A tiny base and finetune in Hugging Face folders, as ``skillbank demo`` writes them."""
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    base.save_pretrained(tmp_path / "base")
    finetune_like(base, seed=1, scale=0.05).save_pretrained(tmp_path / "finetuned")
    return {
        "base": str(tmp_path / "base"),
        "finetuned": str(tmp_path / "finetuned"),
        "bank": str(tmp_path / "bank"),
        "root": str(tmp_path / "runs"),
    }


def mask_args(paths: dict[str, str]) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "mask_demo.yaml"),
        "--model.init_args.model",
        paths["finetuned"],
        "--model.init_args.base",
        paths["base"],
        "--model.init_args.bank",
        paths["bank"],
        "--trainer.default_root_dir",
        paths["root"],
        "--trainer.max_epochs",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_fit_learns_a_mask_from_the_demo_config(demo_like):
    assert main(["fit", *mask_args(demo_like)]) == 0
    bank = SkillBank(demo_like["bank"])
    skill = bank.get("sentiment-learned")
    assert skill.metadata.method == "learned" and skill.metadata.task == "sentiment"
    assert skill.metadata.settings["updates"] == 2 * 4  # 2 epochs of 128 few-shot examples in batches of 32
    assert bank.verify() == {"sentiment-learned": "ok"}


def test_print_config_shows_every_setting(demo_like, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", *mask_args(demo_like), "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    settings = config["model"]["init_args"]
    spec = settings["spec"]
    assert spec["sparsity"] == 0.01 and spec["learner"]["recipe"] == "topk" and settings["base"] == demo_like["base"]
    assert spec["learner"]["pool"] is None and spec["value_dtype"] == "float32"  # defaults shown too
    assert config["data"]["init_args"]["shots_per_class"] == 64
    assert config["trainer"]["max_epochs"] == 2


def test_fit_reports_bad_settings_plainly(demo_like, capsys):
    assert main(["fit", *mask_args(demo_like), "--model.init_args.spec.sparsity", "1.5"]) == 2
    assert "sparsity must be a fraction in (0, 1]" in capsys.readouterr().err


def test_the_demo_config_before_the_demo_says_what_to_run(tmp_path, monkeypatch, capsys):
    import warnings

    monkeypatch.chdir(tmp_path)  # a fresh clone: no skillbank-demo/ yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(CONFIGS / "mask_demo.yaml")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the reason, as the last line (not a traceback)
    assert last.startswith("skillbank fit: error: no model folder at skillbank-demo/finetuned/sentiment")
    assert last.endswith("make them first with `skillbank demo` (it writes them to ./skillbank-demo).")
    assert not [w for w in caught if "args parameter" in str(w.message)]  # no LightningCLI warning about how it was called


def config_with_paths(name: str, paths: dict[str, str], tmp_path: Path, **trainer) -> str:
    """The shipped config ``name`` with the demo folders pointed at the test's tiny ones."""
    text = (CONFIGS / name).read_text()
    for folder, key in (("skillbank-demo/base", "base"), ("skillbank-demo/bank", "bank"), ("skillbank-demo/runs", "root")):
        text = text.replace(folder, paths[key])
    config = yaml.safe_load(text)
    config["trainer"].update({"accelerator": "cpu", "enable_progress_bar": False, **trainer})
    out = tmp_path / name
    out.write_text(yaml.safe_dump(config))
    return str(out)


def test_finetune_harvest_then_serve_stitch(demo_like, tmp_path):
    harvest = config_with_paths("finetune_harvest.yaml", demo_like, tmp_path, max_steps=5, val_check_interval=5)
    assert main(["fit", "--config", harvest]) == 0
    bank = SkillBank(demo_like["bank"])
    assert bank.names() == ["topic-harvested"] and bank.verify() == {"topic-harvested": "ok"}
    assert "val_acc" in bank.get("topic-harvested").metadata.metrics

    serve = yaml.safe_load(Path(config_with_paths("serve_stitch.yaml", demo_like, tmp_path)).read_text())
    serve["trainer"]["callbacks"][0]["init_args"]["skills"] = ["topic-harvested"]
    serve["model"]["init_args"]["skill_head"] = "topic-harvested"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.INFO)  # setLevel, not assignment: it clears the children's cached levels
    lightning_log.addHandler(handler)
    try:
        assert main(["validate", "--config", str(tmp_path / "serve.yaml")]) == 0
    finally:
        lightning_log.removeHandler(handler)
        lightning_log.setLevel(level)
    assert "SkillStitcher: stitched 'topic-harvested' at validation start (step 0) (1 skills)" in messages


def test_real_config_parses_offline(capsys):
    """configs/real_finetune_harvest.yaml names only pulled models and real tasks; it runs under ``-m real``."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / "real_finetune_harvest.yaml"), "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["model"] == "pulled:minilm"
    assert config["data"]["class_path"] == "skillbank.integrations.pulled.data.TextTaskData"
    assert config["data"]["init_args"]["task"] == "spam" and config["trainer"]["max_steps"] == 150


def _own_csv_setup(tmp_path, monkeypatch) -> Path:  # noqa: ANN001
    """The own-data set-up (:func:`helpers.models.own_data`) and the shipped own-data config pointed at ``tmp_path``;
    returns the config."""
    from helpers.models import own_data

    own_data(tmp_path, monkeypatch)
    config = yaml.safe_load(
        (CONFIGS / "finetune_my_data.yaml")
        .read_text()
        .replace("my-bank", str(tmp_path / "bank"))
        .replace("my-runs", str(tmp_path / "runs"))
    )
    config["trainer"].update({"accelerator": "cpu", "enable_progress_bar": False, "max_epochs": 2})
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "mine.yaml"


def _fit_own_csv(config: Path, tmp_path: Path) -> int:
    return main(
        [
            "fit",
            "--config",
            str(config),
            "--data.path",
            str(tmp_path / "my.csv"),
            "--data.text_column",
            "review",
            "--data.label_column",
            "verdict",
            "--model.init_args.lr",
            "0.01",
        ]
    )


def test_your_own_csv_becomes_a_banked_skill_with_no_python(tmp_path, monkeypatch):
    """The shipped config as written (``pulled:minilm``, ``sparsity: auto``), on a checkpoint with a
    ``position_ids`` buffer: the alias is resolved once, by ``skillbank fit``, from a cache that already holds
    the pulled files (here a tiny model in their place), before any class is built."""
    assert _fit_own_csv(_own_csv_setup(tmp_path, monkeypatch), tmp_path) == 0
    bank = SkillBank(tmp_path / "bank")
    assert bank.names() == ["my-task"] and bank.verify() == {"my-task": "ok"}
    skill = bank.get("my-task")
    assert set(skill.head) == {"classifier.weight", "classifier.bias"} and skill.metadata.settings["auto"]["met"]
    assert "embeddings.position_ids" not in skill.metadata.shapes
    assert (tmp_path / "runs" / "finetuned" / "my-task" / "model.safetensors").is_file()  # saved before localizing, kept


def test_a_failed_localization_keeps_the_finetune_and_says_how_to_bank_it(tmp_path, monkeypatch, capsys):
    from skillbank.localization import finetune

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise SkillbankError("the localization broke")

    monkeypatch.setattr(finetune, "search_sparsity", broken)
    assert _fit_own_csv(_own_csv_setup(tmp_path, monkeypatch), tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    saved = tmp_path / "runs" / "finetuned" / "my-task"
    assert err.startswith("skillbank fit: error: the localization broke The finetuned weights are saved in ")
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    command = err.split("bank them with: ")[1].split()
    assert command[:2] == ["skillbank", "localize"] and "--val-data" in command
    assert main([*command[1 : command.index("--sparsity")], "--sparsity", "0.05"]) == 0  # the command, sized by hand
    assert SkillBank(tmp_path / "bank").names() == ["my-task"]


def test_a_table_names_its_problem(tmp_path):
    from skillbank import SkillbankError
    from skillbank.integrations.table_data import read_table

    (tmp_path / "a.tsv").write_text("text\tlabel\nnice\tpos\nbad\tneg\nok\tpos\n")
    split, names = read_table(tmp_path / "a.tsv")
    assert split.texts == ("nice", "bad", "ok") and split.labels == (1, 0, 1) and names == ["neg", "pos"]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 2}\n\n{"text": "y", "label": 0}\n')
    split, names = read_table(tmp_path / "b.jsonl")
    assert split.labels == (2, 0) and names == ["0", "1", "2"]
    (tmp_path / "c.csv").write_text("sentence,label\nhi,1\n")
    with pytest.raises(SkillbankError, match=r"c.csv:2: no 'text' column .*--data.text_column"):
        read_table(tmp_path / "c.csv")
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": 1}\n[1]\n')
    with pytest.raises(SkillbankError, match=r"d.jsonl:2: expected a JSON object"):
        read_table(tmp_path / "d.jsonl")
    with pytest.raises(SkillbankError, match="unknown kind '.txt'"):
        (tmp_path / "e.txt").write_text("x")
        read_table(tmp_path / "e.txt")


class _Runs:
    """Unpickling this calls ``os.getcwd`` (harmless): a stand-in for a checkpoint that would run code."""

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.getcwd, ())


def test_a_pickled_checkpoint_that_would_run_code_is_refused_in_one_line(demo_like, tmp_path, capsys):
    import pickle

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _Runs()}, protocol=2))
    assert main(["fit", *mask_args(demo_like), "--ckpt_path", str(tmp_path / "evil.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"skillbank fit: error: the checkpoint {tmp_path / 'evil.ckpt'} holds objects torch's safe")
    assert not any("Traceback" in line or "Warning" in line for line in err), err
    assert main(["fit", *mask_args(demo_like), "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"skillbank fit: error: Checkpoint file not found: {tmp_path / 'missing.ckpt'}." and not any(
        "Traceback" in line or "Warning" in line for line in err
    ), err

"""``skillbank fit``: the shipped LightningCLI configs parse, print and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertModel

from conftest import finetune_like, tiny_config
from skillbank import SkillBank
from skillbank.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture
def demo_like(tmp_path: Path) -> dict[str, str]:
    """A tiny base and finetune in Hugging Face folders, as ``skillbank demo`` writes them."""
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    base.save_pretrained(tmp_path / "base")
    finetune_like(base, seed=1, scale=0.05).save_pretrained(tmp_path / "finetuned")
    return {"base": str(tmp_path / "base"), "finetuned": str(tmp_path / "finetuned"), "bank": str(tmp_path / "bank"),
            "root": str(tmp_path / "runs")}


def mask_args(paths: dict[str, str]) -> list[str]:
    return [
        "--config", str(CONFIGS / "mask_demo.yaml"),
        "--model.init_args.model", paths["finetuned"], "--model.init_args.base", paths["base"],
        "--model.init_args.bank", paths["bank"], "--trainer.default_root_dir", paths["root"],
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
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
    assert settings["sparsity"] == 0.01 and settings["recipe"] == "topk" and settings["base"] == demo_like["base"]
    assert config["data"]["init_args"]["shots_per_class"] == 64
    assert config["trainer"]["max_epochs"] == 2


def test_fit_reports_bad_settings_plainly(demo_like, capsys):
    assert main(["fit", *mask_args(demo_like), "--model.init_args.sparsity", "1.5"]) == 2
    assert "sparsity must be a fraction in (0, 1]" in capsys.readouterr().err

"""One front door for localization (issue 30): ``skillbank localize`` and ``SkillHarvester`` both call
``localize_finetune``, so the same finetune and data give the same skill, bit for bit, for every method and size."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers.models import finetune_like, tiny_tokenizer
from skillbank import SkillBank, SkillbankError
from skillbank.callbacks import SkillHarvester
from skillbank.integrations.cli import main
from skillbank.integrations.labelled_text import read_jsonl, task_loader
from skillbank.localization.methods import METHODS, LocalizationMethod, get_method, register_method
from skillbank.localization.spec import LocalizationSpec
from skillbank.vectors.models import load_model, load_tokenizer

WORDS = [f"w{i}" for i in range(59)]


@pytest.fixture
def folders(tmp_path, base_model):
    tokenizer = tiny_tokenizer(WORDS)
    base_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    finetune_like(base_model, seed=1, scale=0.05).save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 59, (6,), generator=gen)), "label": n % 2} for n in range(64)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


class Holder(nn.Module):
    """What a finetuning LightningModule holds: the model under ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _by_cli(folders, method: str, sparsity: str):  # noqa: ANN001, ANN202
    argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "ft"), "--bank", str(folders / "cli")]
    argv += ["--name", f"{method}-{sparsity}", "--method", method, "--sparsity", sparsity, "--target-recovery", "0.9"]
    if sparsity == "auto":
        argv += ["--val-data", str(folders / "data.jsonl")]  # also its routing data (the base is a model folder)
    if method == "learned":
        argv += ["--few-shot", str(folders / "data.jsonl")]
    assert main(argv) == 0
    return SkillBank(folders / "cli").get(f"{method}-{sparsity}")


def _by_harvester(folders, method: str, sparsity: str):  # noqa: ANN001, ANN202
    tokenizer = load_tokenizer(folders / "ft")
    split = read_jsonl(folders / "data.jsonl", 2)
    validation = list(task_loader(split, tokenizer, max_length=128, batch_size=64))
    harvester = SkillHarvester(
        folders / "callback",
        f"{method}-{sparsity}",
        base=str(folders / "base"),
        sparsity=sparsity if sparsity == "auto" else float(sparsity),
        method=method,
        target_recovery=0.9,
        few_shot=list(task_loader(split, tokenizer, max_length=128, batch_size=32)),
        validation=validation,
        routing=validation if sparsity == "auto" else None,
    )
    trainer = SimpleNamespace(world_size=1, callback_metrics={}, global_step=0, current_epoch=0, val_dataloaders=None)
    return harvester.harvest(trainer, Holder(load_model(str(folders / "ft"))))


@pytest.mark.parametrize(
    "method, sparsity", [("dataless", "0.05"), ("learned", "0.05"), ("dataless", "auto"), ("learned", "auto")]
)
def test_the_cli_and_the_harvester_make_the_same_skill_bit_for_bit(folders, method, sparsity):
    by_cli, by_callback = _by_cli(folders, method, sparsity), _by_harvester(folders, method, sparsity)
    assert by_cli.regions.keys() == by_callback.regions.keys() and by_cli.num_entries > 0
    for name, region in by_cli.regions.items():
        assert torch.equal(region.indices, by_callback.regions[name].indices), name
        assert torch.equal(region.values, by_callback.regions[name].values), name
    assert by_cli.head.keys() == by_callback.head.keys()
    assert all(torch.equal(t, by_callback.head[n]) for n, t in by_cli.head.items())
    assert by_cli.metadata.method == by_callback.metadata.method == method
    spec = LocalizationSpec.from_dict(by_cli.metadata.settings["spec"])  # the spec round-trips through the skill
    assert spec == LocalizationSpec.from_dict(by_callback.metadata.settings["spec"])
    assert spec.method == method and spec.sparsity == (sparsity if sparsity == "auto" else float(sparsity))
    if sparsity == "auto":
        assert by_cli.metadata.settings["auto"] == by_callback.metadata.settings["auto"]
        assert by_cli.centroids is not None and by_cli.centroids.shape == (2, 16)  # one per label, the base's width (16)
        assert torch.equal(by_cli.centroids, by_callback.centroids) and by_cli.metadata.routing == by_callback.metadata.routing
    else:
        assert by_cli.centroids is None and by_callback.centroids is None


def test_adding_a_method_is_one_module_and_one_registration(folders):
    class Everything(LocalizationMethod):
        name, summary = "everything", "every shared entry (for tests)"

        def localize(self, tv, sparsity, spec, inputs, fields):  # noqa: ANN001, ANN201
            return get_method("dataless").localize(tv, 1.0, spec, inputs, fields)

    register_method(Everything())
    try:
        from skillbank.integrations.cli import build_parser
        from skillbank.localization.finetune import localize_finetune

        localize_help = build_parser()._subparsers._group_actions[0].choices["localize"].format_help()
        assert "everything: every shared entry (for tests)" in " ".join(localize_help.split())  # the CLI lists methods

        skill = localize_finetune(folders / "base", folders / "ft", LocalizationSpec(method="everything"), name="all")
        assert skill.num_entries == skill.num_shared and skill.metadata.settings["spec"]["method"] == "everything"
        with pytest.raises(SkillbankError, match="named 'everything' is registered already"):
            register_method(Everything())
    finally:
        METHODS.pop("everything")
    with pytest.raises(SkillbankError, match="unknown localization method 'everything'; known: dataless, learned"):
        LocalizationSpec(method="everything")


def test_what_a_method_needs_is_named_before_any_work(folders, capsys):
    argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "ft"), "--bank", str(folders / "b")]
    assert main([*argv, "--name", "x", "--method", "learned"]) == 2
    assert "--method learned needs --few-shot FILE" in capsys.readouterr().err
    with pytest.raises(SkillbankError, match="a learned mask needs .* missing: model, few_shot"):
        from skillbank.localization.finetune import localize_finetune

        localize_finetune(folders / "base", folders / "ft", LocalizationSpec(method="learned"), name="x")

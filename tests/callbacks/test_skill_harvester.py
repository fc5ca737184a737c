"""SkillHarvester: a finetuning run leaves a verified skill in the bank."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from helpers import DDP_TIMEOUT
from helpers.models import live_copy
from helpers.modules import quiet_trainer, task_loader
from skillbank import SkillBank, SkillNameError, localize_dataless, task_vector
from skillbank.callbacks import SkillHarvester
from skillbank.errors import SkillbankError
from skillbank.integrations.classifier import SequenceClassifier


def finetune(base_model, callback, steps: int = 12) -> SequenceClassifier:
    module = SequenceClassifier(live_copy(base_model), num_labels=2, lr=0.05, optimizer="sgd")
    trainer = quiet_trainer(
        max_steps=steps, callbacks=[callback], enable_checkpointing=False, val_check_interval=steps, check_val_every_n_epoch=None
    )
    trainer.fit(module, task_loader(), task_loader(n=64, seed=1))
    return module


def test_a_finetune_leaves_a_verified_dataless_skill(base_model, tmp_path, monkeypatch):
    from skillbank.localization import streaming

    streamed = []  # the weights saved before localizing are read back tensor by tensor (memory follows the skill)
    real = streaming.localize_streaming
    monkeypatch.setattr(streaming, "localize_streaming", lambda *a, **k: streamed.append(a[:2]) or real(*a, **k))
    harvester = SkillHarvester(tmp_path / "bank", "sentiment", sparsity=0.05, task="sentiment", finetuned_dir=tmp_path / "ft")
    module = finetune(base_model, harvester)
    assert streamed == [(tmp_path / "ft" / "sentiment" / "base.safetensors", tmp_path / "ft" / "sentiment")]
    assert not (tmp_path / "ft" / "sentiment").exists()  # removed once banked
    bank = SkillBank(tmp_path / "bank")
    assert bank.names() == ["sentiment"] and bank.verify() == {"sentiment": "ok"}
    skill = bank.get("sentiment")
    # base captured at set-up = the base model: same mask as localizing the finished finetune by hand
    expected = localize_dataless(task_vector(base_model, module.model), 0.05, name="sentiment")
    assert skill.metadata.base_fingerprint == expected.metadata.base_fingerprint
    for name, region in expected.regions.items():
        assert torch.equal(skill.regions[name].indices, region.indices)
        assert torch.equal(skill.regions[name].values, region.values)
    assert set(skill.head) == {"classifier.weight", "classifier.bias"}
    assert {"val_acc", "val_loss", "train_loss"} <= set(skill.metadata.metrics)
    assert skill.metadata.source["global_step"] == 12


def test_learned_harvest_uses_the_few_shot_loader(base_model, tmp_path):
    harvester = SkillHarvester(
        tmp_path / "bank",
        "s",
        base=copy.deepcopy(base_model),
        sparsity=0.05,
        method="learned",
        few_shot=task_loader(n=64),
        learner={"recipe": "topk"},
    )
    finetune(base_model, harvester)
    skill = SkillBank(tmp_path / "bank").get("s")
    assert skill.metadata.method == "learned" and skill.metadata.settings["updates"] == 40 * 4
    assert "val_acc" in skill.metadata.metrics and skill.num_entries == harvester.skill.num_entries


def test_the_ranks_wait_budget_follows_the_process_group_timeout():
    from datetime import timedelta
    from types import SimpleNamespace

    from skillbank.callbacks.skill_harvester import wait_budget

    assert wait_budget(SimpleNamespace(world_size=1, strategy=None)) is None
    assert wait_budget(SimpleNamespace(world_size=2, strategy=SimpleNamespace(_timeout=timedelta(minutes=10)))) == 480
    assert wait_budget(SimpleNamespace(world_size=4, strategy=SimpleNamespace())) == 0.8 * 30 * 60  # torch's default


def test_a_learned_mask_that_would_outlast_the_ranks_wait_stops_early_and_says_what_to_do(base_model, tmp_path, monkeypatch):
    """Under DDP rank 0 learns alone while the others wait at a broadcast; a learn projected past their budget stops
    after its first step with the ways out, rather than the other ranks timing out (the budget is shrunk here)."""
    import skillbank.callbacks.skill_harvester as harvester_module
    from skillbank import TimeLimitError

    monkeypatch.setattr(harvester_module, "wait_budget", lambda trainer: 1e-3)
    harvester = SkillHarvester(
        tmp_path / "bank",
        "s",
        base=copy.deepcopy(base_model),
        sparsity=0.05,
        method="learned",
        few_shot=task_loader(n=64),
        learner={"recipe": "topk"},
    )
    with pytest.raises(TimeLimitError, match=r"would take about .* min \(1 of 160 steps.*DDPStrategy\(timeout=") as caught:
        finetune(base_model, harvester)
    assert isinstance(caught.value, TimeoutError)  # "1 of 160 steps": stopped after the first
    assert SkillBank(tmp_path / "bank").names() == []


def test_routing_data_gives_the_skill_centroids_of_the_base_features(base_model, tmp_path):
    from skillbank.stitching.routing import routing_centroids

    routing = task_loader(n=32, seed=2)
    harvester = SkillHarvester(tmp_path / "bank", "s", sparsity=0.05, routing=routing)
    finetune(base_model, harvester)
    skill = SkillBank(tmp_path / "bank").get("s")
    # the base's features (not the finetune's), one centroid per label
    torch.testing.assert_close(skill.centroids, routing_centroids(base_model, routing), rtol=1e-6, atol=1e-6)
    assert skill.centroids.shape == (2, 16) and skill.metadata.routing["centroids"] == 2


def test_keep_examples_stores_a_balanced_set_from_the_runs_validation_data(base_model, tmp_path):
    harvester = SkillHarvester(tmp_path / "bank", "s", sparsity=0.05, keep_examples=5)
    finetune(base_model, harvester)
    kept = SkillBank(tmp_path / "bank").get("s").examples
    assert sorted(kept.labels.tolist()) == [0] * 5 + [1] * 5
    validation = [b for b in task_loader(n=64, seed=1)]  # the fit's validation loader, which it took them from
    rows = {tuple(r) for b in validation for r in b["input_ids"].tolist()}
    assert all(tuple(r) in rows for r in kept.inputs["input_ids"].tolist())


def test_a_taken_name_fails_before_training(base_model, tmp_path):
    finetune(base_model, SkillHarvester(tmp_path / "bank", "s", sparsity=0.05))
    module = SequenceClassifier(live_copy(base_model), num_labels=2)
    trainer = quiet_trainer(max_steps=5, callbacks=[SkillHarvester(tmp_path / "bank", "s")], enable_checkpointing=False)
    with pytest.raises(SkillNameError, match="already has a skill 's'"):
        trainer.fit(module, task_loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(sparsity=0.0), "sparsity must be a fraction"),
        (dict(method="magic"), "unknown localization method .magic.; known: dataless, learned"),
        (dict(method="learned"), "needs few_shot="),
        (dict(name=""), "name the skill"),
        (dict(keep_examples=-1), "keep_examples is a count"),
        (dict(sparsity="half"), r"sparsity must be a fraction in \(0, 1\] or 'auto', got 'half'"),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, kwargs, words):
    settings = {"bank": tmp_path / "bank", "name": "s", **kwargs}
    with pytest.raises(SkillbankError, match=words):
        SkillHarvester(**settings)


def test_a_missing_model_attribute_is_named(base_model, tmp_path):
    module = SequenceClassifier(live_copy(base_model), num_labels=2)
    trainer = quiet_trainer(
        max_steps=2, callbacks=[SkillHarvester(tmp_path / "b", "s", model_attr="backbone")], enable_checkpointing=False
    )
    with pytest.raises(SkillbankError, match="has no attribute 'backbone'"):
        trainer.fit(module, task_loader())


class HoldsNet(pl.LightningModule):
    """A user's module that keeps its Hugging Face model as ``self.net``, not ``self.model``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def test_a_model_kept_under_another_name_is_named_not_folded_into_the_task_vector(base_model, tmp_path):
    from helpers.models import finetune_like

    trainer = quiet_trainer(max_steps=2, callbacks=[SkillHarvester(tmp_path / "b", "s")], enable_checkpointing=False)
    with pytest.raises(SkillbankError, match=r"holds its Hugging Face model as self.net, not self.model; pass model_attr='net'"):
        trainer.fit(HoldsNet(finetune_like(base_model, seed=1)), task_loader())
    trainer = quiet_trainer(
        max_steps=2, callbacks=[SkillHarvester(tmp_path / "b", "s", model_attr="net")], enable_checkpointing=False
    )
    trainer.fit(HoldsNet(finetune_like(base_model, seed=1)), task_loader())
    assert set(SkillBank(tmp_path / "b").get("s").head) == {"classifier.weight", "classifier.bias"}


def harvested_by_two_processes(mode: str, workdir: Path) -> SkillBank:
    """Run ``ddp_callbacks_run.py MODE`` (2 processes); its bank must hold the one skill, written once by rank 0."""
    script = Path(__file__).with_name("ddp_callbacks_run.py")
    done = subprocess.run([sys.executable, str(script), mode, str(workdir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    bank = SkillBank(workdir / "bank")
    assert bank.names() == ["sentiment"] and bank.verify() == {"sentiment": "ok"}
    return bank


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_ddp_finetune_is_harvested_once(tmp_path):
    bank = harvested_by_two_processes("harvest", tmp_path)
    assert bank.get("sentiment").metadata.source["global_step"] == 4


def test_auto_harvest_records_the_size_search_and_needs_validation_data(base_model, tmp_path):
    harvester = SkillHarvester(tmp_path / "bank", "auto", sparsity="auto", target_recovery=0.9, grid=(0.01, 0.05, 0.2, 1.0))
    finetune(base_model, harvester)
    skill = SkillBank(tmp_path / "bank").get("auto")
    auto = skill.metadata.settings["auto"]
    assert auto["met"] and skill.metadata.sparsity == auto["sparsity"] in (0.01, 0.05, 0.2, 1.0)
    tried = {float(s): r for s, r in auto["tried"].items()}
    assert all(r < 0.9 for s, r in tried.items() if s < skill.metadata.sparsity) and tried[skill.metadata.sparsity] >= 0.9
    assert skill.metadata.metrics["val_recovery"] == tried[skill.metadata.sparsity]

    module = SequenceClassifier(live_copy(base_model), num_labels=2, lr=0.05, optimizer="sgd")
    trainer = quiet_trainer(
        max_steps=2, callbacks=[SkillHarvester(tmp_path / "bank", "x", sparsity="auto")], enable_checkpointing=False
    )
    with pytest.raises(SkillbankError, match="needs validation data"):
        trainer.fit(module, task_loader())


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_an_fsdp2_finetune_is_written_tensor_by_tensor_and_harvested_once(tmp_path):
    import json

    from skillbank.callbacks.skill_harvester import BASE_FILE
    from skillbank.vectors.weights import load_weights

    skill = harvested_by_two_processes("fsdp-harvest", tmp_path).get("sentiment")
    assert skill.metadata.source["global_step"] == 4
    folder = tmp_path / "finetuned" / "sentiment"
    files = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) >= 2 and all((folder / f).is_file() for f in files)  # file by file, never one whole copy
    trained, saved = torch.load(tmp_path / "trained.pt"), load_weights(folder)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)  # the trained weights, gathered exactly
    expected = localize_dataless(task_vector(folder / BASE_FILE, folder), 0.05, name="sentiment")  # in one process
    assert skill.regions.keys() == expected.regions.keys()
    for name, region in expected.regions.items():
        assert torch.equal(skill.regions[name].indices, region.indices), name
        assert torch.equal(skill.regions[name].values, region.values), name
    assert skill.head.keys() == expected.head.keys()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(sparsity="auto"), "method='dataless' with sparsity='auto'"),
        (dict(low_rank=4), "low_rank"),
        (dict(keep_examples=2), "keep_examples"),
        (dict(base={"w": torch.zeros(1)}), "a base given as a module or state dict"),
    ],
)
def test_under_fsdp2_what_needs_the_whole_model_is_refused_before_training(base_model, tmp_path, kwargs, words):
    from lightning.pytorch.strategies import ModelParallelStrategy

    harvester = SkillHarvester(tmp_path / "bank", "sentiment", **kwargs)
    trainer = quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    module = SequenceClassifier(live_copy(base_model), num_labels=2)
    with pytest.raises(SkillbankError, match=rf"under ModelParallelStrategy.*{words}.*skillbank localize on the kept folder"):
        harvester.setup(trainer, module, "fit")
    assert not (tmp_path / "bank").exists()

"""SkillHarvester and SkillStitcher in GPU Trainers (``pytest -m cuda``; skipped where no GPU is present)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from helpers.models import live_copy, make_skill, reference_stitch
from helpers.modules import Watcher, quiet_trainer, task_loader
from skillbank import SkillBank, localize_dataless, task_vector
from skillbank.callbacks import SkillHarvester, SkillStitcher
from skillbank.integrations.classifier import SequenceClassifier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", ["dataless", "learned"])
def test_a_gpu_finetune_is_harvested_with_a_base_on_the_cpu(base_model, tmp_path, method):
    harvester = SkillHarvester(
        tmp_path / "bank",
        "s",
        base=copy.deepcopy(base_model),
        sparsity=0.05,
        method=method,
        few_shot=task_loader(n=32) if method == "learned" else None,
    )
    module = SequenceClassifier(live_copy(base_model), num_labels=2, lr=0.05, optimizer="sgd", gradient_clip_val=1.0)
    quiet_trainer(accelerator="gpu", max_steps=8, callbacks=[harvester], enable_checkpointing=False).fit(module, task_loader())
    skill = SkillBank(tmp_path / "bank").get("s")
    assert skill.metadata.method == method and skill.num_entries > 0
    if method == "dataless":  # the same skill as localizing the finished finetune on the CPU
        expected = localize_dataless(task_vector(base_model, module.model.cpu()), 0.05, name="s")
        for name, region in expected.regions.items():
            assert torch.equal(skill.regions[name].indices, region.indices), name


class _Snapshot(pl.Callback):
    """The backbone as validation saw it (a Trainer moves the module back to the CPU when it ends)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.state = {k: v.detach().clone() for k, v in pl_module.model.bert.state_dict().items()}


def test_the_stitcher_callback_stitches_into_a_model_on_the_gpu(base_model, tmp_path):
    skills = [make_skill(base_model, name, seed) for name, seed in (("a", 1), ("b", 2))]
    bank = SkillBank(tmp_path / "bank")
    for skill in skills:
        bank.add(skill)
    module = Watcher(live_copy(base_model))
    stitcher, snapshot = SkillStitcher(tmp_path / "bank", base=base_model), _Snapshot()
    quiet_trainer(accelerator="gpu", callbacks=[stitcher, snapshot]).validate(module, task_loader(n=32))
    assert stitcher.stitched == ["a", "b"] and module.seen_heads[0] == ["a", "b"]
    expected = reference_stitch(base_model.state_dict(), skills)
    for name, tensor in expected.items():
        live = snapshot.state[name]
        assert live.is_cuda
        torch.testing.assert_close(live.cpu(), tensor.float(), rtol=0, atol=1e-6)

"""SkillSwitcher: each batch is answered by the skill it names, with that skill's head."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers.models import finetune_like, live_copy
from helpers.modules import quiet_trainer
from skillbank import SkillBank, SkillbankError, Stitcher, localize_dataless, task_vector
from skillbank.callbacks import SkillStitcher, SkillSwitcher
from skillbank.stitching.switching import group_by_skill


class Named(Dataset):
    """Token ids, each example tagged with the skill that should answer it."""

    def __init__(self, skills: list[str], seed: int = 0) -> None:
        self.ids = torch.randint(0, 64, (len(skills), 8), generator=torch.Generator().manual_seed(seed))
        self.skills = skills

    def __len__(self) -> int:
        return len(self.skills)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "skill": self.skills[i]}


class Recorder(pl.LightningModule):
    """A frozen model that records what it answered, per batch."""

    def __init__(self, model) -> None:  # noqa: ANN001
        super().__init__()
        self.model = model.requires_grad_(False)
        self.seen: list[tuple] = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001, ANN201
        self.seen.append(
            (batch.get("skill"), dataloader_idx, batch["input_ids"], self.model(input_ids=batch["input_ids"]).logits)
        )

    test_step = validation_step


@pytest.fixture
def bank(base_model, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for name, seed, labels in (("a", 1, 2), ("b", 2, 3)):
        bank.add(localize_dataless(task_vector(base_model, finetune_like(base_model, seed, num_labels=labels)), 0.05, name=name))
    return bank


@torch.no_grad()
def alone(base_model, bank, name: str, ids: torch.Tensor) -> torch.Tensor:
    model = live_copy(base_model)
    stitcher = Stitcher(model, bank=bank)
    stitcher.add(name)
    with stitcher.use_head(name) as m:
        return m(input_ids=ids).logits


def test_each_batch_is_answered_by_the_skill_it_names_and_the_base_comes_back(base_model, bank):
    skills = ["a", "b", "a", "b", "b", "a", "a", "b"]
    data = Named(skills)
    loader = DataLoader(data, batch_sampler=group_by_skill(skills, 2, shuffle=True))
    module = Recorder(live_copy(base_model))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    quiet_trainer(callbacks=[SkillSwitcher(bank.path, switch_by="skill")]).validate(module, loader)
    assert [s[0] for s, *_ in module.seen] != sorted(s[0] for s, *_ in module.seen)  # batches interleave skills
    for names, _, ids, logits in module.seen:
        assert len(set(names)) == 1
        torch.testing.assert_close(logits, alone(base_model, bank, names[0], ids), rtol=0, atol=1e-6)
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, before[name]), name  # the base, and the model's own head, bit for bit


def test_one_dataloader_per_skill(base_model, bank):
    loaders = [DataLoader(Named(["x"] * 4, seed=s), batch_size=2) for s in (1, 2)]
    module = Recorder(live_copy(base_model))
    quiet_trainer(callbacks=[SkillSwitcher(bank.path, dataloader_skills=["b", "a"])]).test(module, loaders)
    assert sorted({d for _, d, _, _ in module.seen}) == [0, 1]
    for _, loader_idx, ids, logits in module.seen:
        torch.testing.assert_close(logits, alone(base_model, bank, ["b", "a"][loader_idx], ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("skills, words", [(["a", "b"], "mixes the skills \\['a', 'b'\\]"), (["c", "c"], "did not hold")])
def test_batches_that_name_no_single_known_skill_are_refused(base_model, bank, skills, words):
    module = Recorder(live_copy(base_model))
    with pytest.raises(SkillbankError, match=words):
        quiet_trainer(callbacks=[SkillSwitcher(bank.path, switch_by="skill")]).validate(
            module, DataLoader(Named(skills), batch_size=2)
        )


def test_serving_settings_fail_fast(tmp_path):
    for kwargs in ({"switch_by": "skill", "dataloader_skills": ["a"]}, {}):
        with pytest.raises(SkillbankError, match="one of the two"):
            SkillSwitcher(tmp_path / "bank", **kwargs)
    assert not hasattr(SkillStitcher(tmp_path / "bank"), "switch_by")  # continual stitching has one job
    with pytest.raises(SkillbankError, match="SkillSwitcher holds one skill at a time"):
        SkillSwitcher(tmp_path / "bank", switch_by="skill", rule="tsv_m")

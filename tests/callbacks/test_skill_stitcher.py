"""SkillStitcher: new skills are stitched at the configured moments, exactly once, and survive a resume."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from helpers import DDP_TIMEOUT
from helpers.models import live_copy, make_skill, reference_stitch
from helpers.modules import Watcher, quiet_trainer, task_loader
from skillbank import SkillBank, SkillbankError, Stitcher
from skillbank.callbacks import SkillStitcher


@pytest.fixture
def skills(base_model):
    return [make_skill(base_model, name, seed) for name, seed in (("a", 1), ("b", 2))]


def flat_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class AddFromAnotherProcess(pl.Callback):
    """After training step ``at``, another Python process adds the skill saved at ``path`` to ``bank``."""

    def __init__(self, bank, path, at: int) -> None:  # noqa: ANN001
        self.bank, self.path, self.at, self.before = str(bank), str(path), at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.at:
            self.before = flat_state(pl_module.model)
            code = "import sys; from skillbank import SkillBank, Skill; SkillBank(sys.argv[1]).add(Skill.load(sys.argv[2]))"
            subprocess.run([sys.executable, "-c", code, self.bank, self.path], check=True)


def test_a_skill_added_mid_run_is_stitched_at_the_next_moment(base_model, skills, tmp_path):
    a, b = skills
    SkillBank(tmp_path / "bank").add(a)
    b.save(tmp_path / "b.safetensors")
    adder = AddFromAnotherProcess(tmp_path / "bank", tmp_path / "b.safetensors", at=3)
    stitcher = SkillStitcher(tmp_path / "bank", base=base_model, every_n_steps=2, on_validation_start=False)
    module = Watcher(live_copy(base_model))
    quiet_trainer(max_steps=6, callbacks=[adder, stitcher], enable_checkpointing=False).fit(module, task_loader())
    assert stitcher.history == [("a", 0), ("b", 4)]
    after = flat_state(module.model)
    inside_b = {f"bert.{n}": set(r.indices.tolist()) for n, r in b.regions.items()}
    for name, tensor in after.items():
        changed = torch.nonzero(tensor.view(-1) != adder.before[name].view(-1)).squeeze(1).tolist()
        assert set(changed) <= inside_b.get(name, set()), name  # bits outside b's mask untouched
    expected = reference_stitch(base_model.state_dict(), [a, b])
    for name, tensor in expected.items():
        torch.testing.assert_close(after[f"bert.{name}"], tensor.to(torch.float32), rtol=0, atol=1e-6)
    assert sorted(SkillStitcher.find(module.trainer).heads) == ["a", "b"] == sorted(stitcher.heads)
    assert not hasattr(module, "skill_heads")  # the callback keeps the heads; nothing is written onto the module


@pytest.mark.parametrize("accumulate", [1, 4])
def test_the_bank_is_looked_at_once_per_optimizer_step_whatever_the_accumulation(base_model, skills, tmp_path, accumulate):
    SkillBank(tmp_path / "bank").add(skills[0])
    stitcher = SkillStitcher(tmp_path / "bank", every_n_steps=1, on_validation_start=False)
    looks, asked = [], []
    update, should_update = stitcher.update, stitcher.should_update
    stitcher.update = lambda trainer, module: looks.append(trainer.global_step) or update(trainer, module)
    stitcher.should_update = lambda step, epoch: asked.append(step) or should_update(step, epoch)
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=accumulate, callbacks=[stitcher], enable_checkpointing=False)
    trainer.fit(Watcher(live_copy(base_model)), task_loader(n=16 * 4 * 3))
    assert asked == [0, 1, 2]  # zero-based index of each optimizer step, asked once each
    assert looks == [0, 1, 2, 3]  # at the start, then after each of the 3 optimizer steps


def test_a_resumed_run_does_not_stitch_twice(base_model, skills, tmp_path):
    a, b = skills
    bank = SkillBank(tmp_path / "bank")
    bank.add(a)
    first = Watcher(live_copy(base_model))
    trainer = quiet_trainer(max_steps=3, callbacks=[SkillStitcher(tmp_path / "bank")], enable_checkpointing=False)
    trainer.fit(first, task_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    bank.add(b)

    resumed = Watcher(live_copy(base_model))
    stitcher = SkillStitcher(tmp_path / "bank")
    quiet_trainer(max_steps=6, callbacks=[stitcher], enable_checkpointing=False).fit(
        resumed, task_loader(), ckpt_path=tmp_path / "run.ckpt"
    )
    assert stitcher.stitched == ["a", "b"] and stitcher.history == [("b", 3)]
    reference = live_copy(base_model)
    by_hand = Stitcher(reference, base_model)
    by_hand.add(a)
    by_hand.add(b)
    for name, tensor in reference.bert.state_dict().items():
        assert torch.equal(resumed.model.bert.state_dict()[name], tensor), name  # bitwise: a applied once, then b


def test_validation_runs_see_every_skill_with_its_head(base_model, skills, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for skill in skills:
        bank.add(skill)
    module = Watcher(live_copy(base_model))
    stitcher = SkillStitcher(tmp_path / "bank", skills=["b"])
    quiet_trainer(callbacks=[stitcher]).validate(module, task_loader(n=32))
    assert stitcher.stitched == ["b"] and module.seen_heads[0] == ["b"]
    with stitcher.use_head("b") as model:
        assert torch.equal(model.classifier.weight, skills[1].head["classifier.weight"])


def test_the_rule_is_used_and_a_resume_with_another_rule_is_refused(base_model, skills, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for skill in skills:
        bank.add(skill)
    module = Watcher(live_copy(base_model))
    trainer = quiet_trainer(max_steps=2, callbacks=[SkillStitcher(tmp_path / "bank", rule="sum")], enable_checkpointing=False)
    trainer.fit(module, task_loader())
    by_hand = live_copy(base_model)
    stitcher = Stitcher(by_hand, rule="sum")
    for skill in skills:
        stitcher.add(skill)
    for name, tensor in by_hand.bert.state_dict().items():
        assert torch.equal(module.model.bert.state_dict()[name], tensor), name
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = Watcher(live_copy(base_model))
    with pytest.raises(SkillbankError, match="rule 'sum'"):
        quiet_trainer(max_steps=4, callbacks=[SkillStitcher(tmp_path / "bank")], enable_checkpointing=False).fit(
            resumed, task_loader(), ckpt_path=tmp_path / "run.ckpt"
        )


def test_a_matrix_composition_is_stitched_resumed_and_checked(base_model, skills, tmp_path):
    from skillbank.stitching.spectral_stitcher import SpectralStitcher

    a, b = skills
    bank = SkillBank(tmp_path / "bank")
    bank.add(a)
    first = Watcher(live_copy(base_model))
    trainer = quiet_trainer(
        max_steps=3, callbacks=[SkillStitcher(tmp_path / "bank", rule="tsv_m", scale=1.5)], enable_checkpointing=False
    )
    trainer.fit(first, task_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    bank.add(b)
    resumed = Watcher(live_copy(base_model))
    stitcher = SkillStitcher(tmp_path / "bank", rule="tsv_m", scale=1.5)
    quiet_trainer(max_steps=6, callbacks=[stitcher], enable_checkpointing=False).fit(
        resumed, task_loader(), ckpt_path=tmp_path / "run.ckpt"
    )
    assert stitcher.stitched == ["a", "b"] and stitcher.history == [("b", 3)]
    reference = live_copy(base_model)
    by_hand = SpectralStitcher(reference, base_model, merge="tsv_m", scale=1.5)
    by_hand.add(a)
    by_hand.add(b)
    for name, tensor in reference.bert.state_dict().items():
        assert torch.equal(resumed.model.bert.state_dict()[name], tensor), name  # bitwise, after the resume
    with pytest.raises(SkillbankError, match=r"rule 'tsv_m' \(scale 1.5\).*SkillStitcher\(rule='tsv_m', scale=1.5\)"):
        quiet_trainer(max_steps=4, callbacks=[SkillStitcher(tmp_path / "bank", rule="tsv_m")], enable_checkpointing=False).fit(
            Watcher(live_copy(base_model)), task_loader(), ckpt_path=tmp_path / "run.ckpt"
        )


def test_a_missing_bank_or_skill_is_warned_about_and_no_bank_is_created(base_model, skills, tmp_path):
    module = Watcher(live_copy(base_model))
    nowhere = SkillStitcher(tmp_path / "no-such-bank")
    with pytest.warns(UserWarning, match=r"no bank at .*no-such-bank \(yet\), so nothing is stitched.*check the path"):
        quiet_trainer(callbacks=[nowhere]).validate(module, task_loader(n=32))
    assert nowhere.stitched == [] and not (tmp_path / "no-such-bank").exists()

    bank = SkillBank(tmp_path / "bank")
    bank.add(skills[0])
    typo = SkillStitcher(tmp_path / "bank", skills=["a", "typo"])
    with pytest.warns(UserWarning, match=r"\['typo'\] are not in .*it holds \['a'\].*Check the names"):
        quiet_trainer(callbacks=[typo]).validate(module, task_loader(n=32))
    assert typo.stitched == ["a"]

    late = SkillStitcher(tmp_path / "later")  # a bank another run fills after this one started
    trainer, watched = quiet_trainer(callbacks=[late]), Watcher(live_copy(base_model))
    with pytest.warns(UserWarning, match="no bank at"):
        trainer.validate(watched, task_loader(n=32))
    SkillBank(tmp_path / "later").add(skills[1])
    trainer.validate(watched, task_loader(n=32))
    assert late.stitched == ["b"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(every_n_steps=0), "every_n_steps must be"),
        (dict(file=True), "is a file"),
        (dict(rule="median"), "unknown overlap rule"),
        (dict(rule="mean", scale=2.0), "scale applies to a matrix composition"),
        (dict(rule="tsv_m", scale=-1.0), "scale must be a positive number"),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, kwargs, words):
    bank = tmp_path / "bank"
    if kwargs.pop("file", False):
        bank.write_text("not a bank")
    with pytest.raises(SkillbankError, match=words):
        SkillStitcher(bank, **kwargs)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_ddp_ranks_stitch_the_same_skills_in_the_same_order(base_model, skills, tmp_path):
    import json
    from pathlib import Path

    bank = SkillBank(tmp_path / "bank")
    for skill in reversed(skills):  # bank order is b, a: every rank must follow it
        bank.add(skill)
    script = Path(__file__).with_name("ddp_callbacks_run.py")
    done = subprocess.run([sys.executable, str(script), "stitch", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["stitched"] == reports[1]["stitched"] == ["b", "a"]
    assert reports[0]["digest"] == reports[1]["digest"]


class AddDuringPredict(pl.Callback):
    """After predict batch ``at``, the bank gets ``skill`` (as another process would add it)."""

    def __init__(self, bank, skill, at: int) -> None:  # noqa: ANN001
        self.bank, self.skill, self.at = bank, skill, at

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
        if batch_idx == self.at:
            SkillBank(self.bank).add(self.skill)


def test_a_predict_loop_logs_the_batch_a_skill_arrived_after_not_a_step(base_model, skills, tmp_path, caplog):
    import logging

    a, b = skills
    SkillBank(tmp_path / "bank").add(a)
    stitcher = SkillStitcher(tmp_path / "bank", base=base_model, every_n_steps=1)
    callbacks = [AddDuringPredict(tmp_path / "bank", b, at=4), stitcher]  # the adder runs first
    module = Watcher(live_copy(base_model))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        quiet_trainer(callbacks=callbacks, enable_checkpointing=False).predict(module, task_loader(), return_predictions=False)
    messages = [r.getMessage() for r in caplog.records if "SkillStitcher" in r.getMessage()]
    assert messages == [
        "SkillStitcher: stitched 'a' at predict start (1 skills)",
        "SkillStitcher: stitched 'b' after predict batch 4 (2 skills)",
    ]

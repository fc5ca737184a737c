"""sparsity="auto": the smallest grid size that keeps the target, on a model where the answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from skillbank import SkillbankError, task_vector
from skillbank.localization.auto_sparsity import localize_auto, search_sparsity
from skillbank.storage.skill import Skill, SkillMetadata

CLASSES = 10  # class c is told by feature c; the task lives in exactly the 10 diagonal entries of a 10 x 100 weight


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(CLASSES, 100))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=x @ self.weight.T)


def known_task():
    base = Linear()
    finetuned = Linear()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        finetuned.weight.add_(torch.randn(CLASSES, 100, generator=gen) * 1e-3)  # small drift everywhere
        finetuned.weight[torch.arange(CLASSES), torch.arange(CLASSES)] = 1.0  # the skill: 10 of 1,000 entries = 1%
    labels = torch.arange(CLASSES).repeat(20)
    x = torch.zeros(labels.numel(), 100)
    x[torch.arange(labels.numel()), labels] = 1.0
    x[:, CLASSES:] = torch.rand(labels.numel(), 100 - CLASSES, generator=gen)  # distractor features
    batches = [{"x": x[i : i + 50], "labels": labels[i : i + 50]} for i in range(0, labels.numel(), 50)]
    return base, finetuned, batches


def test_auto_picks_the_smallest_size_that_keeps_the_target():
    base, finetuned, batches = known_task()
    tv = task_vector(base.state_dict(), finetuned.state_dict())
    skill = localize_auto(tv, base, batches, name="t", target=0.99)
    meta = skill.metadata
    assert meta.sparsity == 0.01 and skill.num_entries == 10  # 0.5% (5 entries) keeps 5 of 10 classes
    auto = meta.settings["auto"]
    assert auto["met"] and auto["reference"] == 1.0 and list(auto["tried"]) == ["0.001", "0.002", "0.005", "0.01"]
    assert auto["tried"]["0.005"] < 0.99 <= auto["tried"]["0.01"] == meta.metrics["val_recovery"]
    assert torch.equal(base.weight, torch.zeros(CLASSES, 100))  # the probe model is the base again
    loose = localize_auto(tv, base, batches, name="t", target=0.5)
    assert loose.metadata.sparsity == 0.005


def test_auto_sizes_runs_of_entries_by_what_they_keep_too():
    base, finetuned, batches = known_task()
    tv = task_vector(base.state_dict(), finetuned.state_dict())
    skill = localize_auto(tv, base, batches, name="t", target=0.99, block=4)
    # each class's entry needs a run of 4 of its own: 10 runs, 40 entries; 2% holds 5 runs, 5% holds 13
    assert skill.metadata.sparsity == 0.05 and skill.num_entries == 52 and skill.metadata.settings["block"] == 4
    assert skill.metadata.settings["auto"]["tried"]["0.02"] < 0.99
    diagonal = torch.arange(CLASSES) * 101
    assert bool(torch.isin(diagonal, skill.regions["weight"].indices).all())


def test_auto_without_validation_data_says_what_to_do():
    base, finetuned, _ = known_task()
    tv = task_vector(base.state_dict(), finetuned.state_dict())
    with pytest.raises(SkillbankError, match="needs validation data"):
        localize_auto(tv, base, None, name="t")


def fake(s: float) -> Skill:
    return Skill(SkillMetadata("t", "fp", s, {}), {})


@pytest.mark.parametrize(
    "start, expected_tries, chosen",
    [
        (0.05, [0.05, 0.02, 0.01, 0.005], 0.01),  # meets at the start: step down until it fails
        (0.002, [0.002, 0.005, 0.01], 0.01),  # fails at the start: step up until it meets
    ],
)
def test_a_search_from_a_start_runs_the_maker_only_where_needed(start, expected_tries, chosen):
    made = []

    def make(s: float) -> Skill:
        made.append(s)
        return fake(s)

    skill, choice = search_sparsity(make, lambda k: 1.0 if k.metadata.sparsity >= 0.01 else 0.5, 1.0, start=start)
    assert made == expected_tries and choice.sparsity == chosen == skill.metadata.sparsity and choice.met


def test_a_target_nothing_meets_returns_the_best_tried():
    _, choice = search_sparsity(fake, lambda k: k.metadata.sparsity, 1.0, target=0.99, grid=(0.1, 0.3, 0.2))
    assert not choice.met and choice.sparsity == 0.3 and list(choice.tried) == [0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(target=0), "target recovery"),
        (dict(grid=()), "grid"),
        (dict(start=0.03), "not on the grid"),
        (dict(reference=0.0), "reference"),
    ],
)
def test_bad_search_settings_are_refused(kwargs, words):
    reference = kwargs.pop("reference", 1.0)
    with pytest.raises(SkillbankError, match=words):
        search_sparsity(fake, lambda k: 1.0, reference, **kwargs)

"""The one-skill serving path: bit for bit what the Stitcher holds for one skill, and the base back bit for bit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.models import finetune_like, live_copy, make_skill
from skillbank import BaseMismatchError, SkillBank, Stitcher, StitchError
from skillbank.stitching.single_skill import SingleSkillSwitcher
from skillbank.storage.low_rank import LowRank


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors (each live copy gets a fresh random classifier, which no skill here writes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("bert.")}


def _alone(base_model, skill) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """What a Stitcher holding only ``skill`` makes of the model."""
    model = live_copy(base_model)
    Stitcher(model).add(skill)
    return _state(model)


def test_each_switch_holds_exactly_what_the_stitcher_holds_for_that_skill_and_none_is_the_base(base_model):
    skills = [make_skill(base_model, n, seed, sparsity=0.3) for n, seed in (("a", 1), ("b", 2), ("c", 3))]  # overlapping
    model = live_copy(base_model)
    base = _state(model)
    switcher = SingleSkillSwitcher(model)
    prepared = {s.name: switcher.prepare(s) for s in skills}
    for name in ("a", "b", "c", "a"):
        switcher.switch(prepared[name])
        assert switcher.held == name
        expected = _alone(base_model, next(s for s in skills if s.name == name))
        for key, value in _state(model).items():
            assert torch.equal(value, expected[key]), (name, key)
    switcher.switch(None)
    assert switcher.held is None
    for key, value in _state(model).items():
        assert torch.equal(value, base[key]), key


def test_a_skill_checked_without_the_union_layout_adds_as_a_placed_one(base_model):
    skill = make_skill(base_model, "a", 1, sparsity=0.3)
    lazy_model, eager_model = live_copy(base_model), live_copy(base_model)
    lazy, eager = Stitcher(lazy_model), Stitcher(eager_model)
    checked = lazy.prepare(skill, place=False)  # what the switcher prepares from: checked, not laid out
    placed = eager.prepare(skill)
    assert checked.batch.placed is None and placed.batch.placed is not None
    assert torch.equal(checked.batch.local, placed.batch.local) and torch.equal(checked.batch.values, placed.batch.values)
    lazy.add(checked)  # laid out at the add
    eager.add(placed)
    assert all(torch.equal(v, _state(eager_model)[k]) for k, v in _state(lazy_model).items())


def test_a_skill_prepared_while_another_is_held_reads_the_base_values(base_model):
    a, b = make_skill(base_model, "a", 1, sparsity=0.3), make_skill(base_model, "b", 2, sparsity=0.3)
    model = live_copy(base_model)
    switcher = SingleSkillSwitcher(model)
    switcher.switch(switcher.prepare(a))
    late = switcher.prepare(b)  # a's entries hold base + τ_a now; b's base values must not
    early = SingleSkillSwitcher(live_copy(base_model)).prepare(b)
    for part, twin in zip(late.parts, early.parts, strict=True):
        assert part.run == twin.run, part.name
        assert all(torch.equal(x, y) for x, y in zip(part[2:], twin[2:])), part.name
    switcher.switch(late)
    for key, value in _state(model).items():
        assert torch.equal(value, _alone(base_model, b)[key]), key


def test_coded_skills_from_the_bank_answer_as_the_stitcher_does(base_model, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for name, seed in (("a", 1), ("b", 2)):
        skill = make_skill(base_model, name, seed, sparsity=0.2)
        skill.head = {
            k: v for k, v in finetune_like(base_model, seed, num_labels=2 + seed).state_dict().items() if "classifier" in k
        }
        bank.add(replace(skill, metadata=replace(skill.metadata, value_dtype="2bit")))
    batch = {"input_ids": torch.tensor([[2, 7, 9, 11, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    reference = Stitcher(live_copy(base_model), base_model, bank=bank)
    model = live_copy(base_model)
    switcher = SingleSkillSwitcher(model, base_model, bank=bank)
    prepared = {n: switcher.prepare(n) for n in ("a", "b")}
    with torch.no_grad():
        for name in ("b", "a", "b"):
            with reference.active(name) as expected, switcher.active(prepared[name]) as served:
                assert torch.equal(served(**batch).logits, expected(**batch).logits), name
    assert switcher.held is None  # active() put back what was held


def test_refusals_leave_the_model_as_it_was(base_model):
    model = live_copy(base_model)
    base = _state(model)
    switcher = SingleSkillSwitcher(model, base_model)
    other = SingleSkillSwitcher(live_copy(base_model)).prepare(make_skill(base_model, "a", 1))
    with pytest.raises(StitchError, match="prepared for another switcher"):
        switcher.switch(other)
    skill = make_skill(base_model, "lr", 2)
    name = next(iter(skill.metadata.shapes))
    shape = skill.metadata.shapes[name]
    if len(shape) == 2:
        skill.low_rank = {name: LowRank(torch.zeros(shape[0], 1), torch.zeros(1, shape[1]))}
    else:  # pragma: no cover - the tiny BERT's first tensor is the embedding matrix
        pytest.skip("no matrix")
    with pytest.raises(StitchError, match="low-rank parts"):
        switcher.prepare(skill)
    foreign = finetune_like(base_model, 9)  # another base: its skills' fingerprints differ
    stranger = make_skill(foreign.bert, "x", 3)
    with pytest.raises(BaseMismatchError):
        switcher.prepare(stranger)
    for key, value in _state(model).items():
        assert torch.equal(value, base[key]), key

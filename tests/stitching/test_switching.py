"""Switching a live model between skill sets: only the masks that leave or arrive are rewritten, exactly."""

from __future__ import annotations

import pytest
import torch
from test_stitcher import BASE, BASE_STATE, bert_state, in_mask, random_skill

from helpers.models import live_copy, make_skill, reference_stitch
from skillbank import SkillBank, Stitcher, StitchError


def union_mask(skills, name: str, numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    for skill in skills:
        mask |= in_mask(skill, name, numel)
    return mask


def test_switch_rewrites_only_the_skills_that_leave_and_arrive():
    a, b, c = (random_skill(n, seed, 0.5) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    model = live_copy(BASE)
    stitcher = Stitcher(model)
    stitcher.switch([a, b])
    before = bert_state(model)
    stitcher.switch([b, c])
    assert stitcher.stitched == ["b", "c"]
    after = bert_state(model)
    expected = reference_stitch(BASE_STATE, [b, c])
    for name, value in after.items():
        outside = ~union_mask([a, c], name, value.numel())
        assert torch.equal(value.reshape(-1)[outside], before[name].reshape(-1)[outside]), name
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    stitcher.switch([])
    for name, value in bert_state(model).items():
        assert torch.equal(value, BASE_STATE[name]), name


def test_active_serves_one_skill_with_its_head_and_restores_the_set_bitwise(base_model, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    skills = [make_skill(base_model, n, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3))]
    for skill in skills[:2]:
        bank.add(skill)
    model = live_copy(base_model)
    stitcher = Stitcher(model, base_model, bank=bank)
    stitcher.switch(["a", "b", skills[2]])  # two from the bank, one in memory
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with stitcher.active("b") as served:
        assert stitcher.stitched == ["b"]
        assert torch.equal(served.classifier.weight, skills[1].head["classifier.weight"])
        alone = reference_stitch(base_model.state_dict(), [skills[1]])
        for name, value in alone.items():
            torch.testing.assert_close(model.bert.state_dict()[name], value, rtol=0, atol=1e-6)
    assert sorted(stitcher.stitched) == ["a", "b", "c"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, held[name]), name  # back bit for bit, the model's own head included


def test_active_switches_back_when_the_block_raises():
    a, b = random_skill("a", 1, 0.5), random_skill("b", 2, 0.5)
    model = live_copy(BASE)
    stitcher = Stitcher(model)
    stitcher.add(a)
    held = bert_state(model)
    with pytest.raises(RuntimeError), stitcher.active(b):
        raise RuntimeError("a failing batch")
    assert stitcher.stitched == ["a"]
    for name, value in bert_state(model).items():
        assert torch.equal(value, held[name]), name


def test_a_switch_naming_a_skill_twice_is_refused_before_anything_changes():
    a = random_skill("a", 1, 0.5)
    stitcher = Stitcher(live_copy(BASE))
    with pytest.raises(StitchError, match="repeat"):
        stitcher.switch([a, "a"])
    assert stitcher.stitched == []

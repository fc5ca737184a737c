"""The Stitcher keeps the math: bitwise locality, the batch formula, exact removal, averaged overlaps."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BertModel

from helpers.models import finetune_like, live_copy, make_skill, reference_stitch, tiny_config
from skillbank import (
    BaseMismatchError,
    Region,
    Skill,
    SkillBank,
    SkillMetadata,
    Stitcher,
    StitchError,
    base_fingerprint,
    localize_dataless,
    task_vector,
)

torch.manual_seed(0)
BASE = BertModel(tiny_config()).eval()
BASE_STATE = {k: v.clone() for k, v in BASE.state_dict().items() if v.is_floating_point()}
FINGERPRINT = base_fingerprint(BASE_STATE)
POOL = {k: torch.rand(v.numel(), generator=torch.Generator().manual_seed(7)) < 0.15 for k, v in BASE_STATE.items()}


def random_skill(name: str, seed: int, density: float) -> Skill:
    """A skill whose mask is drawn inside a small shared pool, so skills overlap a lot."""
    gen = torch.Generator().manual_seed(seed)
    regions = {}
    for pname, theta in BASE_STATE.items():
        chosen = POOL[pname] & (torch.rand(theta.numel(), generator=gen) < density)
        idx = torch.nonzero(chosen).squeeze(1)
        regions[pname] = Region(idx, torch.randn(idx.numel(), generator=gen))
    meta = SkillMetadata(name, FINGERPRINT, density, {k: list(v.shape) for k, v in BASE_STATE.items()})
    return Skill(meta, regions)


def bert_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.bert.state_dict().items() if v.is_floating_point()}


def in_mask(skill: Skill, name: str, numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[skill.regions[name].indices] = True
    return mask


operations = st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 3)), min_size=1, max_size=12)


def check_any_sequence(skills: list[Skill], ops, rule: str, expected) -> None:  # noqa: ANN001
    """Apply ``ops`` (add/remove, skill index); after each, only that skill's mask changed and the model is
    ``expected(stitched skills)``; removing all gives the base back bit for bit."""
    model = live_copy(BASE)
    stitcher = Stitcher(model, rule=rule)
    for op, i in ops:
        skill = skills[i]
        if (op == "add") == (skill.name in stitcher):
            continue
        before = bert_state(model)
        stitcher.add(skill) if op == "add" else stitcher.remove(skill.name)
        after = bert_state(model)
        for name, value in after.items():
            outside = ~in_mask(skill, name, value.numel())
            assert torch.equal(value.reshape(-1)[outside], before[name].reshape(-1)[outside]), name
        want = expected([s for s in skills if s.name in stitcher])
        for name, value in after.items():
            torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-6)
    for name in stitcher.stitched:
        stitcher.remove(name)
    for name, value in bert_state(model).items():
        assert torch.equal(value, BASE_STATE[name]), f"{rule}: {name} is not the base again"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, seeds=st.lists(st.integers(0, 10_000), min_size=4, max_size=4), density=st.floats(0.2, 0.8))
def test_any_sequence_matches_batch_formula_and_touches_only_its_mask(ops, seeds, density):
    skills = [random_skill(f"s{i}", seed, density) for i, seed in enumerate(seeds)]
    check_any_sequence(skills, ops, "mean", lambda stitched: reference_stitch(BASE_STATE, stitched))


def test_overlap_is_averaged_and_single_cover_applies_as_is():
    shapes = {k: list(v.shape) for k, v in BASE_STATE.items()}
    name = "encoder.layer.0.attention.self.query.weight"
    a = Skill(SkillMetadata("a", FINGERPRINT, 0.1, shapes), {name: Region(torch.tensor([3, 5]), torch.tensor([1.0, 2.0]))})
    b = Skill(SkillMetadata("b", FINGERPRINT, 0.1, shapes), {name: Region(torch.tensor([5, 9]), torch.tensor([4.0, -8.0]))})
    model = live_copy(BASE)
    stitcher = Stitcher(model, BASE)
    stitcher.add(a)
    stitcher.add(b)
    flat = model.bert.state_dict()[name].reshape(-1)
    base = BASE_STATE[name].reshape(-1)
    torch.testing.assert_close(flat[5], base[5] + (2.0 + 4.0) / 2)
    torch.testing.assert_close(flat[3], base[3] + 1.0)
    torch.testing.assert_close(flat[9], base[9] - 8.0)
    stitcher.remove("b")
    torch.testing.assert_close(flat[5], base[5] + 2.0)
    assert torch.equal(flat[9], base[9])


def test_real_localized_skills_stitch_onto_a_wrapping_model_with_heads():
    model = live_copy(BASE)
    stitcher = Stitcher(model, BASE)
    skills = [make_skill(BASE, f"t{i}", seed=i) for i in range(3)]
    for skill in skills:
        stitcher.add(skill)
    assert stitcher.stitched == ["t0", "t1", "t2"]
    expected = reference_stitch(BASE_STATE, skills)
    for name, value in bert_state(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    ids = torch.tensor([[2, 5, 7, 9]])
    classifier_before = model.classifier.weight.detach().clone()
    for skill in skills:
        with stitcher.use_head(skill.name) as m:
            assert torch.equal(m.classifier.weight, skill.head["classifier.weight"])
            logits = m(ids).logits
        reference = copy.deepcopy(model)
        reference.classifier.weight.data = skill.head["classifier.weight"].clone()
        reference.classifier.bias.data = skill.head["classifier.bias"].clone()
        torch.testing.assert_close(logits, reference(ids).logits)
    assert torch.equal(model.classifier.weight, classifier_before)


def test_head_with_another_label_count_swaps_in():
    skill = localize_dataless(task_vector(BASE, finetune_like(BASE, 3, num_labels=5)), 0.05, name="five")
    model = live_copy(BASE)
    stitcher = Stitcher(model)
    stitcher.add(skill)
    with stitcher.use_head("five") as m:
        assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 5)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


def test_bank_backed_stitcher_rereads_skills_for_removal(tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for i in range(2):
        bank.add(make_skill(BASE, f"t{i}", seed=i))
    model = live_copy(BASE)
    stitcher = Stitcher(model, bank=bank)
    stitcher.add("t0")
    stitcher.add("t1")
    assert stitcher._stitched["t0"].skill is None  # not kept in memory
    stitcher.remove("t0")
    stitcher.remove("t1")
    for name, value in bert_state(model).items():
        assert torch.equal(value, BASE_STATE[name])


# -- bad input: a clear error, and the model untouched -------------------------


def assert_untouched(model, reference):
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_skill_from_another_base_is_refused_and_model_untouched():
    torch.manual_seed(123)
    other = BertModel(tiny_config()).eval()
    skill = make_skill(other, "alien", seed=1)
    model = live_copy(BASE)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BaseMismatchError, match="another base"):
        Stitcher(model).add(skill)
    assert_untouched(model, before)


def test_model_that_differs_from_given_base_is_refused():
    model = finetune_like(BASE, seed=4)
    with pytest.raises(BaseMismatchError, match="differs from the base"):
        Stitcher(model, BASE)


def test_already_modified_model_fails_fingerprint_check():
    model = finetune_like(BASE, seed=4)
    with pytest.raises(BaseMismatchError):
        Stitcher(model).add(make_skill(BASE, "t", seed=1))


@pytest.mark.parametrize(
    "other_config, match",
    [({"vocab_size": 80}, "shape"), ({"num_hidden_layers": 1}, "does not have")],
    ids=["shape-mismatch", "missing-parameter"],
)
def test_other_architecture_is_refused_before_touching_the_model(other_config, match):
    skill = make_skill(BASE, "t", seed=1)
    torch.manual_seed(0)
    other = live_copy(BertModel(tiny_config(**other_config)).eval())
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(StitchError, match=match):
        Stitcher(other).add(skill)
    assert_untouched(other, before)


def test_out_of_range_and_nan_regions_are_refused_before_any_write():
    shapes = {k: list(v.shape) for k, v in BASE_STATE.items()}
    name = "pooler.dense.bias"
    ok = Region(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    for bad, match in [
        (Region(torch.tensor([0, 10_000]), torch.tensor([1.0, 1.0])), "outside"),
        (Region(torch.tensor([-1, 3]), torch.tensor([1.0, 1.0])), "outside"),
        (Region(torch.tensor([4, 4]), torch.tensor([1.0, 1.0])), "ascending"),
        (Region(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")])), "NaN"),
    ]:
        skill = Skill(SkillMetadata("bad", FINGERPRINT, 0.1, shapes), {"embeddings.LayerNorm.bias": ok, name: bad})
        model = live_copy(BASE)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(StitchError, match=match):
            Stitcher(model).add(skill)
        assert_untouched(model, before)


def test_duplicate_add_and_unknown_remove_are_clear_errors():
    stitcher = Stitcher(live_copy(BASE))
    stitcher.add(make_skill(BASE, "t", seed=1))
    with pytest.raises(StitchError, match="already stitched"):
        stitcher.add(make_skill(BASE, "t", seed=1))
    with pytest.raises(StitchError, match="not stitched"):
        stitcher.remove("never")
    with pytest.raises(StitchError, match="no bank"):
        stitcher.add("by-name")


def test_removal_restores_base_bitwise_even_when_the_running_sum_rounded():
    shapes = {k: list(v.shape) for k, v in BASE_STATE.items()}
    name = "pooler.dense.bias"
    big = Skill(SkillMetadata("big", FINGERPRINT, 0.1, shapes), {name: Region(torch.tensor([2]), torch.tensor([1e20]))})
    one = Skill(SkillMetadata("one", FINGERPRINT, 0.1, shapes), {name: Region(torch.tensor([2]), torch.tensor([1.0]))})
    model = live_copy(BASE)
    stitcher = Stitcher(model)
    stitcher.add(big)
    stitcher.add(one)  # 1e20 + 1 rounds to 1e20 in float64
    stitcher.remove("big")
    stitcher.remove("one")
    assert torch.equal(model.bert.pooler.dense.bias, BASE_STATE[name])


def test_a_tensor_that_changed_size_since_the_stitcher_was_made_is_refused(base_model):
    skill = make_skill(base_model, "a", seed=1)
    model = live_copy(base_model)
    stitcher = Stitcher(model, base_model)
    prepared = stitcher.prepare(skill)
    name = next(n for n, r in skill.regions.items() if len(r))
    target = dict(model.bert.named_parameters())[name]
    target.data = target.data.reshape(-1)[: target.numel() // 2].clone()  # smaller storage under the same parameter
    with pytest.raises(StitchError, match="changed size or layout"):
        stitcher.add(prepared)

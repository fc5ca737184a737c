"""Overlap rules: each against a plain per-entry reference, in any order of adds and removes, touching only its mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_stitcher import BASE, BASE_STATE, bert_state, check_any_sequence, random_skill
from transformers import BertModel

from helpers.models import finetune_like, live_copy, tiny_config
from skillbank import Stitcher, StitchError, localize_dataless, task_vector
from skillbank.comparison.baselines import ties
from skillbank.stitching.overlap import RULES, OverlapRule, get_rule


def reference_entry(rule: str, values: list[float]) -> float:
    """What one entry becomes under ``rule`` when the skills covering it hold ``values`` (written plainly)."""
    if rule == "mean":
        return sum(values) / len(values)
    if rule == "sum":
        return sum(values)
    assert rule == "sign_mean"
    total = sum(values)
    agree = [v for v in values if v != 0 and (v > 0) == (total > 0)] if total != 0 else []
    return sum(agree) / len(agree) if agree else 0.0


def reference(rule: str, skills) -> dict[str, torch.Tensor]:
    out = {}
    for name, theta in BASE_STATE.items():
        covering: dict[int, list[float]] = {}
        for skill in skills:
            region = skill.regions[name]
            for i, v in zip(region.indices.tolist(), region.values.double().tolist()):
                covering.setdefault(i, []).append(v)
        flat = theta.reshape(-1).double().clone()
        for i, values in covering.items():
            flat[i] += reference_entry(rule, values)
        out[name] = flat.to(theta.dtype).reshape(theta.shape)
    return out


operations = st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 3)), min_size=1, max_size=10)


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, seeds=st.lists(st.integers(0, 10_000), min_size=4, max_size=4))
def test_every_rule_matches_its_reference_in_any_order_and_touches_only_the_mask(rule, ops, seeds):
    skills = [random_skill(f"s{i}", seed, 0.6) for i, seed in enumerate(seeds)]
    check_any_sequence(skills, ops, rule, lambda stitched: reference(rule, stitched))


def test_sign_mean_over_top_d_masks_is_ties_at_scale_one():
    torch.manual_seed(3)
    base = BertModel(tiny_config()).eval()
    state = {k: v.clone() for k, v in base.state_dict().items() if v.is_floating_point()}
    taus = [task_vector(base, finetune_like(base, seed)) for seed in (1, 2, 3)]
    model = live_copy(base)
    stitcher = Stitcher(model, rule="sign_mean")
    for i, tv in enumerate(taus):
        stitcher.add(localize_dataless(tv, 0.2, name=f"t{i}"))
    merged = ties([tv.shared for tv in taus], 0.2, 1.0)
    for name, value in model.bert.state_dict().items():
        if name in merged:
            torch.testing.assert_close(value, state[name] + merged[name], rtol=0, atol=1e-6)


def test_sign_mean_and_sum_differ_from_the_mean_where_skills_overlap():
    a, b = random_skill("a", 1, 0.9), random_skill("b", 2, 0.9)
    results = {}
    for rule in ("mean", "sum", "sign_mean"):
        model = live_copy(BASE)
        stitcher = Stitcher(model, rule=rule)
        stitcher.add(a)
        stitcher.add(b)
        results[rule] = bert_state(model)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(results["mean"][name], results["sum"][name])
    assert not torch.equal(results["mean"][name], results["sign_mean"][name])


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(StitchError, match="sign_mean"):
        Stitcher(live_copy(BASE), rule="median")


def test_a_second_rule_of_a_taken_name_is_refused():
    from skillbank.errors import SkillbankError
    from skillbank.stitching.overlap import get_rule
    from skillbank.stitching.overlap.rule import register_rule

    with pytest.raises(SkillbankError, match="an overlap rule named 'mean' is registered already; give the new one another name"):
        register_rule(type(get_rule("mean")))


@pytest.mark.parametrize("rule", ["mean", "sum"])
def test_relaxed_form_equals_the_rule_at_binary_gates(rule):
    impl: OverlapRule = get_rule(rule)
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(200, impl.columns, dtype=torch.float64)
    count = torch.randint(0, 3, (200,), generator=gen).double()
    for c in range(2):
        impl.update(acc, torch.where(count > c, torch.randn(200, generator=gen, dtype=torch.float64), 0.0), 1)
    tau = torch.randn(200, generator=gen, dtype=torch.float64)
    gate = (torch.rand(200, generator=gen) < 0.5).double()
    after = acc.clone()
    chosen = gate.bool()
    sub = after[chosen]
    impl.update(sub, tau[chosen], 1)
    after[chosen] = sub
    new_count = count + gate
    expected = torch.where(new_count > 0, impl.delta(after, new_count.clamp(min=1)), 0.0)
    torch.testing.assert_close(impl.relaxed(acc, count, gate, tau), expected)


def test_sign_mean_has_no_relaxed_form():
    with pytest.raises(StitchError, match="no differentiable form"):
        get_rule("sign_mean").relaxed(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1), torch.zeros(1))

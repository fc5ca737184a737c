"""``spectral_delta``: a bank's skills composed matrix by matrix (TSV-M, Iso-C, Iso-CTS), from what they hold."""

from __future__ import annotations

import pytest
import torch

from helpers.models import make_skill
from skillbank import StitchError, localize_dataless, task_vector
from skillbank.comparison.spectral import iso_c, tsv_m
from skillbank.stitching.spectral import compose_spectral, spectral_delta, tsv_skill_parts
from skillbank.storage.skill import Region, Skill, SkillMetadata
from skillbank.vectors.spectral import MATRIX_MERGES


def _dense(skill: Skill) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in skill.metadata.shapes.items():
        flat = torch.zeros(torch.Size(shape).numel())
        region = skill.regions.get(name)
        if region is not None:
            flat[region.indices] = region.values.float()
        out[name] = flat.reshape(shape)
    return out


@pytest.mark.parametrize("merge, reference", [("tsv_m", tsv_m), ("iso_c", iso_c)])
def test_whole_skills_compose_as_the_global_merge_of_their_task_vectors(base_model, merge, reference):
    from helpers.models import finetune_like

    skills = [localize_dataless(task_vector(base_model, finetune_like(base_model, seed=s)), 1.0, name=f"s{s}") for s in (1, 2, 3)]
    delta = spectral_delta(skills, merge, scale=1.5)
    expected = reference([_dense(s) for s in skills], scale=1.5)
    mean = reference([_dense(s) for s in skills], scale=1.0)
    assert delta.keys() == {n for n in expected if expected[n].abs().sum() > 0}
    for name, tensor in delta.items():  # every skill covers every entry: the covering mean is the plain mean, unscaled
        want = expected[name] if tensor.dim() == 2 and "embeddings" not in name else mean[name]
        torch.testing.assert_close(tensor, want, rtol=1e-4, atol=1e-6, msg=name)


def test_the_set_decides_not_the_order_of_arrival(base_model):
    skills = [make_skill(base_model, f"s{i}", seed=i, sparsity=0.2) for i in range(4)]
    first = spectral_delta(skills, "iso_cts")
    again = spectral_delta([skills[2], skills[0], skills[3], skills[1]], "iso_cts")
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)  # bit for bit
    fewer = spectral_delta(skills[:3], "iso_cts")  # a skill leaves: recomputed from the others
    assert any(not torch.equal(first[n], fewer[n]) for n in fewer)


def _meta(name: str) -> SkillMetadata:
    return SkillMetadata(name, "fp", 0.5, {"layer.weight": [2, 3], "layer.bias": [3]})


def test_only_the_skills_touching_a_matrix_share_it_and_biases_take_the_covering_mean():
    a = Skill(_meta("a"), {"layer.weight": Region(torch.tensor([0, 4]), torch.tensor([3.0, 1.0]))})
    b = Skill(_meta("b"), {"layer.bias": Region(torch.tensor([1, 2]), torch.tensor([2.0, 4.0]))})
    c = Skill(_meta("c"), {"layer.bias": Region(torch.tensor([2]), torch.tensor([6.0]))})
    delta = spectral_delta([a, b, c], "tsv_m")
    # a alone touches the matrix: it keeps all min(2, 3) = 2 of its directions, i.e. its own matrix
    torch.testing.assert_close(delta["layer.weight"], torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(delta["layer.bias"], torch.tensor([0.0, 2.0, 5.0]))  # entry 2: (4 + 6) / 2


def test_bad_compositions_are_refused():
    a = Skill(_meta("a"), {"layer.bias": Region(torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(StitchError, match="unknown spectral merge 'svd'; known: iso_c, iso_cts, tsv_m"):
        spectral_delta([a], "svd")
    with pytest.raises(StitchError, match="two skills share a name"):
        spectral_delta([a, a])
    other = Skill(
        SkillMetadata("b", "fp", 0.5, {"layer.bias": [4]}), {"layer.bias": Region(torch.tensor([0]), torch.tensor([1.0]))}
    )
    with pytest.raises(StitchError, match="skills disagree on the shape of 'layer.bias'"):
        spectral_delta([a, other])
    assert spectral_delta([], "tsv_m") == {}


def test_each_skills_tsv_part_adds_up_to_the_composition(base_model):
    skills = [make_skill(base_model, f"s{i}", seed=i, sparsity=0.3) for i in range(3)]
    parts = tsv_skill_parts(skills)
    delta = spectral_delta(skills, "tsv_m")
    assert set(parts) == {"s0", "s1", "s2"}
    for tensor, merged in delta.items():
        total = sum(p[tensor] for p in parts.values() if tensor in p)
        torch.testing.assert_close(total, merged, rtol=1e-5, atol=1e-6, msg=tensor)
    matrix = next(n for n in delta if n.endswith("query.weight"))
    ranks = [int(torch.linalg.matrix_rank(p[matrix])) for p in parts.values()]
    keep = min(delta[matrix].shape) // 3  # each skill keeps r // T directions
    assert keep > 0 and ranks == [keep] * 3


def _lone_and_shared() -> tuple[Skill, Skill]:
    """``a`` alone touches ``layer.weight`` (singular values 3 and 1); ``a`` and ``b`` share ``other.weight``."""
    shapes = {"layer.weight": [2, 3], "other.weight": [2, 3], "layer.bias": [3]}
    a = Skill(
        SkillMetadata("a", "fp", 0.5, shapes),
        {
            "layer.weight": Region(torch.tensor([0, 4]), torch.tensor([3.0, 1.0])),
            "other.weight": Region(torch.tensor([1]), torch.tensor([2.0])),
            "layer.bias": Region(torch.tensor([0]), torch.tensor([1.0])),
        },
    )
    b = Skill(SkillMetadata("b", "fp", 0.5, shapes), {"other.weight": Region(torch.tensor([3, 5]), torch.tensor([1.0, -2.0]))})
    return a, b


@pytest.mark.parametrize("merge", ["iso_c", "iso_cts"])
def test_a_flattening_merge_takes_a_matrix_one_skill_touches_as_its_own_tau_unscaled(merge):
    a, b = _lone_and_shared()
    composed = compose_spectral([a, b], merge)
    assert composed.scaled == {"other.weight"}
    delta = spectral_delta([a, b], merge, scale=3.0)
    assert torch.equal(delta["layer.weight"], torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # not flattened to 2, 2
    shared = MATRIX_MERGES[merge]([_dense(a)["other.weight"], _dense(b)["other.weight"]])
    assert torch.equal(delta["other.weight"], 3.0 * shared) and not torch.equal(shared, _dense(a)["other.weight"])
    assert torch.equal(delta["layer.bias"], torch.tensor([1.0, 0.0, 0.0]))  # the covering mean, unscaled
    alone = spectral_delta([a], merge, scale=3.0)  # one skill: itself in every matrix, as the skill alone gives it
    assert all(torch.equal(alone[n], _dense(a)[n]) for n in alone)
    # the paper's merge of one task vector still flattens it: only the skills' composition takes a lone skill as itself
    assert torch.linalg.svdvals(MATRIX_MERGES[merge]([_dense(a)["layer.weight"]])).tolist() == pytest.approx([2.0, 2.0])


def test_tsv_m_gives_a_lone_skill_back_as_itself_and_scales_it():
    a, b = _lone_and_shared()
    delta = spectral_delta([a, b], "tsv_m", scale=3.0)
    assert torch.equal(delta["layer.weight"], 3.0 * _dense(a)["layer.weight"])
    assert compose_spectral([a, b], "tsv_m").scaled == {"layer.weight", "other.weight"}

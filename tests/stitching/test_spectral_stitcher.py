"""``SpectralStitcher``: each weight matrix composed by TSV-M / Iso-C / Iso-CTS, the rest by the mean rule; exact,
order-free, back to the base bit for bit."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from helpers.models import live_copy, make_skill, tiny_config
from skillbank import BaseMismatchError, SkillBank, StitchError
from skillbank.stitching.spectral import spectral_delta
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.storage.skill import Region, Skill, SkillMetadata


def _state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def skills(base_model):  # noqa: ANN201
    return [make_skill(base_model, f"s{i}", seed=i + 1, sparsity=0.2) for i in range(3)]


@pytest.mark.parametrize("merge", ["tsv_m", "iso_c", "iso_cts"])
def test_the_model_holds_the_base_plus_the_spectral_composition(base_model, skills, merge):
    model = copy.deepcopy(base_model)
    stitcher = SpectralStitcher(model, base_model, merge=merge, scale=1.3)
    for skill in skills:
        stitcher.add(skill)
    delta = spectral_delta(skills, merge, 1.3)
    base = base_model.state_dict()
    for name, tensor in model.state_dict().items():
        expected = base[name] + delta[name] if name in delta else base[name]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
    matrix = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(model.state_dict()[matrix], base[matrix])
    assert stitcher.stitched == ["s0", "s1", "s2"] and "s1" in stitcher and len(stitcher) == 3


def test_any_arrival_order_and_any_removal_give_the_same_model_bit_for_bit(base_model, skills):
    def stitched(order, remove=()):  # noqa: ANN001, ANN202
        model = copy.deepcopy(base_model)
        stitcher = SpectralStitcher(model, merge="tsv_m", scale=1.5)
        for i in order:
            stitcher.add(skills[i])
        for i in remove:
            stitcher.remove(skills[i].name)
        return _state(model)

    assert _equal(stitched([0, 1, 2]), stitched([2, 0, 1]))
    assert _equal(stitched([0, 1, 2], remove=[1]), stitched([2, 0]))  # a skill leaves: as if it never came
    assert _equal(stitched([0, 1, 2], remove=[0, 2, 1]), _state(base_model))  # every skill gone: the base, bit for bit


@pytest.mark.parametrize("merge", ["tsv_m", "iso_c"])
def test_rescale_gives_what_a_stitcher_made_at_that_scale_holds_bit_for_bit(base_model, skills, merge, monkeypatch):
    def stitched(scale, rescale=None):  # noqa: ANN001, ANN202
        model = copy.deepcopy(base_model)
        stitcher = SpectralStitcher(model, merge=merge, scale=scale)
        for skill in skills[:2]:
            stitcher.add(skill)
        if rescale is not None:
            stitcher.rescale(rescale)
        return model, stitcher

    fresh, _ = stitched(2.5)
    model, stitcher = stitched(1.0, rescale=2.5)
    assert stitcher.scale == 2.5 and _equal(_state(model), _state(fresh))
    assert not _equal(_state(model), _state(stitched(1.0)[0]))  # the scale did change the model
    stitcher.add(skills[2])  # later arrivals compose at the new scale
    stitcher.remove(skills[0].name)
    expected, other = stitched(2.5)
    other.add(skills[2])
    other.remove(skills[0].name)
    assert _equal(_state(model), _state(expected))
    fresh_at_1_5, _ = stitched(1.5)
    model_b, stitcher_b = stitched(1.0, rescale=2.0)
    import skillbank.stitching.spectral_stitcher as module

    monkeypatch.setattr(module, "compose_spectral", None)  # a sweep after the first rescale composes nothing again
    stitcher_b.rescale(3.0)
    stitcher_b.rescale(1.5)
    assert _equal(_state(model_b), _state(fresh_at_1_5))
    monkeypatch.undo()
    before = _state(model)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(StitchError, match="scale must be a positive number"):
            stitcher.rescale(bad)
    assert _equal(_state(model), before) and stitcher.scale == 2.5
    for name in list(stitcher.stitched):
        stitcher.remove(name)
    assert _equal(_state(model), _state(base_model))


def test_reset_and_heads_and_the_bank(base_model, skills, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    for skill in skills:
        bank.add(skill)
    model = live_copy(base_model)  # a classifier over the base: names matched through its wrapper
    before = _state(model)
    stitcher = SpectralStitcher(model, base_model, bank=bank, merge="iso_cts", scale=2.0)
    stitcher.add("s0")
    stitcher.add(skills[1])
    assert stitcher.heads.keys() == {"s0", "s1"} and stitcher.metadata["s0"].name == "s0"
    assert not _equal(_state(model), before)
    restored = copy.deepcopy(model)  # a checkpoint's weights: the base values put back return it to the base
    tensors = restored.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, (indices, values) in stitcher.base_values().items():
            tensors[name].data.view(-1).index_copy_(0, indices, values)
    assert _equal(_state(restored), before)
    with stitcher.use_head("s0") as head_model:
        assert head_model is model
    stitcher.reset()
    assert _equal(_state(model), before) and len(stitcher) == 0
    with pytest.raises(StitchError, match="no bank"):
        SpectralStitcher(copy.deepcopy(base_model)).add("s0")


def test_a_refused_skill_leaves_the_model_as_it_was(base_model, skills):
    model = copy.deepcopy(base_model)
    stitcher = SpectralStitcher(model, merge="tsv_m")
    stitcher.add(skills[0])
    before = _state(model)
    matrix = "encoder.layer.0.attention.self.query.weight"
    region = skills[1].regions[matrix]
    damaged = replace(skills[1], regions={**skills[1].regions, matrix: Region(region.indices.flip(0), region.values)})
    with pytest.raises(StitchError, match="not strictly ascending; the skill is damaged"):
        stitcher.add(damaged)
    poisoned = replace(
        skills[1], regions={**skills[1].regions, matrix: Region(region.indices, torch.full_like(region.values, float("nan")))}
    )
    with pytest.raises(StitchError, match="NaN/Inf values"):
        stitcher.add(poisoned)
    torch.manual_seed(7)
    from transformers import BertModel

    other = make_skill(BertModel(tiny_config()).eval(), "other", seed=3)
    with pytest.raises(BaseMismatchError):
        stitcher.add(other)
    with pytest.raises(StitchError, match="already stitched"):
        stitcher.add(skills[0])
    assert _equal(_state(model), before) and stitcher.stitched == ["s0"]


def test_bad_settings_are_refused(base_model):
    with pytest.raises(StitchError, match="unknown spectral merge 'mean'; known: iso_c, iso_cts, tsv_m"):
        SpectralStitcher(copy.deepcopy(base_model), merge="mean")
    with pytest.raises(StitchError, match="scale must be a positive number"):
        SpectralStitcher(copy.deepcopy(base_model), scale=0.0)


def test_a_composition_that_fails_leaves_the_model_and_the_stitcher_as_they_were(base_model, skills, monkeypatch):
    import skillbank.stitching.spectral_stitcher as module

    model = copy.deepcopy(base_model)
    stitcher = SpectralStitcher(model, merge="tsv_m")
    stitcher.add(skills[0])
    stitcher.add(skills[1])
    before = _state(model)

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(module, "compose_spectral", failing)
    with pytest.raises(torch.linalg.LinAlgError):
        stitcher.add(skills[2])
    with pytest.raises(torch.linalg.LinAlgError):
        stitcher.remove("s0")  # s1 still touches its matrices: they would be recomputed
    with pytest.raises(torch.linalg.LinAlgError):
        stitcher.rescale(2.0)
    assert _equal(_state(model), before) and stitcher.stitched == ["s0", "s1"] and stitcher.scale == 1.0
    monkeypatch.undo()
    stitcher.add(skills[2])  # and it goes on as if nothing had happened
    again = copy.deepcopy(base_model)
    reference = SpectralStitcher(again, merge="tsv_m")
    for skill in skills:
        reference.add(skill)
    assert _equal(_state(model), _state(again))


def test_an_svd_that_float32_cannot_converge_on_is_taken_in_float64(monkeypatch):
    from skillbank.vectors import spectral

    real = torch.linalg.svd

    def float32_fails(a, full_matrices=True):  # noqa: ANN001, ANN202
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    matrix = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    u, s, vh = spectral.svd(matrix)
    assert s.dtype == torch.float32 and s.tolist() == [3.0, 1.0]
    torch.testing.assert_close(u @ torch.diag(s) @ vh, matrix)


def test_tsv_m_arrivals_reuse_each_skills_singular_directions_and_stay_exact(base_model, skills, monkeypatch):
    import skillbank.stitching.spectral as module

    calls: list[str] = []
    real = module.top_factors

    def counted(a, keep):  # noqa: ANN001, ANN202
        calls.append(f"{tuple(a.shape)}:{keep}")
        return real(a, keep)

    monkeypatch.setattr(module, "top_factors", counted)
    model = copy.deepcopy(base_model)
    stitcher = SpectralStitcher(model, merge="tsv_m", scale=1.5)
    stitcher.add(skills[0])
    assert calls == []  # one skill alone is its own τ: no SVD
    stitcher.add(skills[1])
    matrices = len(calls) // 2  # both skills' SVDs, once each, in every matrix they share
    assert matrices > 0
    calls.clear()
    stitcher.add(skills[2])
    assert len(calls) == matrices  # the newcomer's alone: the others' directions were kept
    fresh = copy.deepcopy(base_model)
    reference = SpectralStitcher(fresh, merge="tsv_m", scale=1.5)  # no cache yet: every SVD taken
    for skill in skills:
        reference.add(skill)
    assert _equal(_state(model), _state(fresh))
    calls.clear()
    stitcher.remove("s1")  # each survivor keeps more directions now: taken again, exactly
    assert len(calls) == 2 * matrices
    again = copy.deepcopy(base_model)
    rebuilt = SpectralStitcher(again, merge="tsv_m", scale=1.5)
    for skill in (skills[2], skills[0]):
        rebuilt.add(skill)
    assert _equal(_state(model), _state(again))
    assert {k[0] for k in stitcher._factors} == {"s0", "s2"}  # a removed skill's directions are dropped


def test_tsv_parts_from_known_factors_are_the_same_bits():
    from skillbank.vectors.spectral import top_factors, tsv_keep, tsv_parts

    torch.manual_seed(0)
    mats = [torch.randn(6, 4) for _ in range(3)]
    keep = tsv_keep(mats)
    wider = [top_factors(m, keep + 1) for m in mats]  # more than kept: sliced to the share
    for known, plain in zip(tsv_parts(mats, wider), tsv_parts(mats)):
        assert torch.equal(known, plain)


@pytest.mark.parametrize("merge", ["iso_c", "iso_cts"])
def test_a_matrix_one_skill_touches_holds_its_own_tau_through_adds_rescales_and_removes(merge):
    from skillbank.vectors.spectral import MATRIX_MERGES
    from skillbank.vectors.weights import base_fingerprint

    torch.manual_seed(0)
    base = {"layer.weight": torch.randn(2, 3), "other.weight": torch.randn(2, 3), "layer.bias": torch.zeros(3)}
    model = {k: v.clone() for k, v in base.items()}
    shapes = {k: list(v.shape) for k, v in base.items()}
    fingerprint = base_fingerprint(base)
    a = Skill(
        SkillMetadata("a", fingerprint, 0.5, shapes),
        {
            "layer.weight": Region(torch.tensor([0, 4]), torch.tensor([3.0, 1.0])),
            "other.weight": Region(torch.tensor([1]), torch.tensor([2.0])),
        },
    )
    b = Skill(
        SkillMetadata("b", fingerprint, 0.5, shapes), {"other.weight": Region(torch.tensor([3, 5]), torch.tensor([1.0, -2.0]))}
    )

    def dense(skill: Skill, matrix: str) -> torch.Tensor:
        region = skill.regions[matrix]
        return torch.zeros(6).index_put_((region.indices,), region.values).reshape(2, 3)

    stitcher = SpectralStitcher(model, merge=merge, scale=2.0)
    stitcher.add(a)  # alone: itself everywhere, as the skill alone (not flattened, not scaled)
    assert torch.equal(model["layer.weight"], base["layer.weight"] + dense(a, "layer.weight"))
    assert torch.equal(model["other.weight"], base["other.weight"] + dense(a, "other.weight"))
    stitcher.add(b)  # the shared matrix is merged and scaled; the one only a touches is left as it was
    shared = MATRIX_MERGES[merge]([dense(a, "other.weight"), dense(b, "other.weight")])
    assert torch.equal(model["other.weight"], base["other.weight"] + 2.0 * shared)
    assert torch.equal(model["layer.weight"], base["layer.weight"] + dense(a, "layer.weight"))
    stitcher.rescale(5.0)
    assert torch.equal(model["other.weight"], base["other.weight"] + 5.0 * shared)
    assert torch.equal(model["layer.weight"], base["layer.weight"] + dense(a, "layer.weight"))
    stitcher.remove("b")  # a alone again, after a rescale: its own τ, unscaled, as a fresh stitcher at 5 gives it
    fresh = {k: v.clone() for k, v in base.items()}
    SpectralStitcher(fresh, merge=merge, scale=5.0).add(a)
    assert _equal(model, fresh) and torch.equal(model["other.weight"], base["other.weight"] + dense(a, "other.weight"))
    stitcher.remove("a")
    assert _equal(model, base)

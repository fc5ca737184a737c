"""Calibration: per-skill, per-layer weights of a TSV-M composition learned on the examples the skills keep."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.models import live_copy, make_skill
from skillbank import StitchError
from skillbank.stitching.spectral import tsv_skill_parts
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.storage.examples import Examples


def _state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The backbone's tensors (each live copy's own classifier starts at random)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("bert.")}


def _examples(seed: int, labelled: bool = True) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (12, 6), generator=gen)
    labels = torch.randint(0, 2, (12,), generator=gen) if labelled else None
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


@pytest.fixture
def skills(base_model):  # noqa: ANN201
    # large enough task vectors that the composition differs from each skill alone on its examples
    return [replace(make_skill(base_model, f"s{i}", seed=i + 1, sparsity=0.3), examples=_examples(i)) for i in range(3)]


def _stitched(base_model, skills, **kwargs):  # noqa: ANN001, ANN202
    model = live_copy(base_model)
    stitcher = SpectralStitcher(model, base_model, merge="tsv_m", scale=kwargs.pop("scale", 1.0))
    for skill in skills:
        stitcher.add(skill)
    return model, stitcher


def test_calibration_lowers_its_loss_and_writes_the_weighted_parts(base_model, skills):
    for loss in ("distill", "labels", "entropy"):
        model, stitcher = _stitched(base_model, skills, scale=1.5)
        record = stitcher.calibrate(loss=loss, steps=15, lr=0.05)
        assert record.losses[-1] < record.losses[0], loss
        assert len(record.losses) == 16 and record.examples == {"s0": 12, "s1": 12, "s2": 12}
        assert record.groups == ("bert.encoder.layer.0", "bert.encoder.layer.1", "other")  # the pooler: other
        assert any(abs(w - 1) > 1e-3 for ws in record.weights.values() for w in ws)
    # the model holds base + Σ weight · scale · part in each matrix (the last calibration's weights)
    parts = tsv_skill_parts(skills)
    base = base_model.state_dict()
    name = "encoder.layer.1.attention.self.query.weight"
    column = record.groups.index("bert.encoder.layer.1")
    expected = base[name] + sum(record.weights[s][column] * 1.5 * parts[s][name] for s in ("s0", "s1", "s2"))
    torch.testing.assert_close(model.state_dict()["bert." + name], expected, rtol=1e-4, atol=1e-6)


def test_zero_steps_keep_the_composition_and_the_same_settings_give_the_same_weights(base_model, skills):
    model, stitcher = _stitched(base_model, skills)
    plain = _state(model)
    record = stitcher.calibrate(steps=0)
    assert all(w == 1.0 for ws in record.weights.values() for w in ws) and len(record.losses) == 1
    for name, tensor in plain.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    again = _stitched(base_model, skills)[1].calibrate(steps=5, per="skill")
    assert again == _stitched(base_model, skills)[1].calibrate(steps=5, per="skill") and again.groups == ("all",)


def test_an_add_or_remove_drops_the_weights_and_the_base_still_comes_back_bit_for_bit(base_model, skills):
    model, stitcher = _stitched(base_model, skills[:2])
    stitcher.calibrate(steps=5, lr=0.1)
    stitcher.add(skills[2])
    assert stitcher.calibration is None
    fresh, _ = _stitched(base_model, skills)
    assert all(torch.equal(v, _state(fresh)[k]) for k, v in _state(model).items())  # the plain composition of the set
    stitcher.calibrate(steps=5, lr=0.1)
    for skill in skills:
        stitcher.remove(skill.name)
    assert all(torch.equal(v, _state(live_copy(base_model))[k]) for k, v in _state(model).items())


def test_what_calibration_refuses(base_model, skills):
    _, stitcher = _stitched(base_model, [skills[0], replace(skills[1], examples=None)])
    with pytest.raises(StitchError, match=r"skills \['s1'\] keep no examples.*--keep-examples"):
        stitcher.calibrate()
    _, stitcher = _stitched(base_model, [replace(skills[0], examples=_examples(0, labelled=False))])
    with pytest.raises(StitchError, match="unlabelled examples"):
        stitcher.calibrate(loss="labels")
    assert stitcher.calibrate(loss="entropy", steps=1).loss == "entropy"
    with pytest.raises(StitchError, match="unknown calibration loss 'mse'"):
        stitcher.calibrate(loss="mse")
    iso = SpectralStitcher(live_copy(base_model), merge="iso_c")
    with pytest.raises(StitchError, match="TSV-M's per-skill parts"):
        iso.calibrate()

"""Skills with a low-rank part: the top singular directions of each matrix's τ plus a sparse mask of the rest,
stored exactly, checked on read, composed matrix by matrix and refused by the per-entry rules."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, save

from helpers.models import finetune_like, live_copy
from skillbank import LocalizationSpec, Skill, SkillFileError, Stitcher, StitchError, task_vector
from skillbank.errors import SkillbankError
from skillbank.localization.low_rank import localize_low_rank
from skillbank.stitching.spectral import spectral_delta
from skillbank.stitching.spectral_stitcher import SpectralStitcher

MATRIX = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def tv(base_model):  # noqa: ANN201
    return task_vector(base_model, finetune_like(base_model, seed=3))


def _header(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["skillbank"])


def test_each_matrix_keeps_its_top_directions_and_the_mask_takes_the_top_of_what_they_leave(tv):
    skill = localize_low_rank(tv, 2, 0.05, name="t")
    tau = tv.shared[MATRIX]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(skill.low_rank[MATRIX].dense(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-6)
    assert (
        "embeddings.word_embeddings.weight" not in skill.low_rank
        and "encoder.layer.0.output.LayerNorm.weight" not in skill.low_rank
    )
    assert skill.metadata.settings["low_rank"] == {"rank": 2, "matrices": len(skill.low_rank)}
    # the sparse region holds the residual's largest entries, and its values are the residual's there
    residual = tau - skill.low_rank[MATRIX].dense()
    region = skill.regions[MATRIX]
    torch.testing.assert_close(region.values, residual.reshape(-1)[region.indices], rtol=1e-5, atol=1e-7)
    threshold = min(float(r.values.abs().min()) for r in skill.regions.values() if len(r))
    outside = torch.ones(residual.numel(), dtype=torch.bool)
    outside[region.indices] = False
    assert float(residual.reshape(-1)[outside].abs().max()) <= threshold + 1e-7
    # at full rank the low-rank part is τ: nothing is left for the mask to matter
    full = localize_low_rank(tv, 16, 0.01, name="t")
    torch.testing.assert_close(full.low_rank[MATRIX].dense(), tau, rtol=1e-4, atol=1e-5)


def test_low_rank_parts_round_trip_at_format_2_and_in_bfloat16(tv):
    skill = localize_low_rank(tv, 3, 0.02, name="t")
    data = skill.to_bytes()
    back = Skill.from_bytes(data)
    assert _header(data)["format_version"] == 2 and back.num_low_rank == skill.num_low_rank > 0
    for name, part in skill.low_rank.items():
        assert torch.equal(back.low_rank[name].left, part.left) and torch.equal(back.low_rank[name].right, part.right)
    small = replace(skill, metadata=replace(skill.metadata, value_dtype="bfloat16"))
    back = Skill.from_bytes(small.to_bytes())
    torch.testing.assert_close(back.low_rank[MATRIX].left, skill.low_rank[MATRIX].left.bfloat16().float())
    assert len(small.to_bytes()) < len(data) - skill.num_low_rank * 2 + 4096


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"lowrank/{MATRIX}/right"), "needs a left and a right factor"),
        (
            lambda t: t.update({"lowrank/nope.weight/left": torch.ones(2, 1), "lowrank/nope.weight/right": torch.ones(1, 2)}),
            "header lists",
        ),
        (lambda t: t.update({f"lowrank/{MATRIX}/left": torch.ones(16, 3, dtype=torch.int32)}), "must be float factors"),
        (lambda t: t.update({f"lowrank/{MATRIX}/left": torch.ones(8, 3)}), r"is \[8, 16\], its parameter \[16, 16\]"),
        (lambda t: t.update({f"lowrank/{MATRIX}/left": torch.full((16, 3), float("nan"))}), "NaN or infinite"),
        (lambda t: t.update({f"lowrank/{MATRIX}/middle": torch.ones(2)}), "unexpected tensor"),
        (
            lambda t: t.update({f"lowrank/{MATRIX}/left": torch.ones(16, 20), f"lowrank/{MATRIX}/right": torch.ones(20, 16)}),
            r"1 <= r <= min",
        ),
    ],
)
def test_crafted_low_rank_parts_are_refused_naming_the_file(tv, edit, message):
    data = localize_low_rank(tv, 3, 0.02, name="t").to_bytes()
    tensors = load(data)
    edit(tensors)
    crafted = save(tensors, metadata={"skillbank": json.dumps(_header(data))})
    with pytest.raises(SkillFileError, match=message) as caught:
        Skill.from_bytes(crafted, origin="crafted.safetensors")
    assert "crafted.safetensors" in str(caught.value)


def test_the_per_entry_stitcher_refuses_them_and_the_spectral_stitcher_composes_them(base_model, tv):
    skills = [
        localize_low_rank(tv, 2, 0.02, name="a"),
        localize_low_rank(task_vector(base_model, finetune_like(base_model, 4)), 1, 0.02, name="b"),
    ]
    model = live_copy(base_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StitchError, match="carries low-rank parts.*matrix by matrix"):
        Stitcher(model).add(skills[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stitcher = SpectralStitcher(model, base_model, merge="tsv_m", scale=1.2)
    for skill in skills:
        stitcher.add(skill)
    delta = spectral_delta(skills, "tsv_m", 1.2)
    torch.testing.assert_close(model.state_dict()["bert." + MATRIX], base_model.state_dict()[MATRIX] + delta[MATRIX])
    stitcher.remove("b")
    region = skills[0].regions[MATRIX]
    alone = skills[0].low_rank[MATRIX].dense() + torch.zeros(256).index_put_((region.indices,), region.values).reshape(16, 16)
    assert torch.equal(model.state_dict()["bert." + MATRIX], base_model.state_dict()[MATRIX] + 1.2 * alone)  # TSV-M of one
    stitcher.remove("a")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the base, bit for bit


def test_low_rank_is_a_dataless_spec_field(tv):
    assert LocalizationSpec(low_rank=4).low_rank == 4
    with pytest.raises(SkillbankError, match="made by the dataless method"):
        LocalizationSpec(method="learned", low_rank=4)
    with pytest.raises(SkillbankError, match="low_rank must be a whole number"):
        LocalizationSpec(low_rank=-1)
    with pytest.raises(SkillbankError, match="rank must be a whole number"):
        localize_low_rank(tv, 0, name="t")

"""The skill file: exact round trips, compact values, and loud refusal of anything malformed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from helpers.models import make_skill
from skillbank import Skill, SkillFileError, SkillMetadata


def test_round_trip_is_exact(base_model):
    skill = make_skill(base_model, "t", seed=1)
    skill.metadata.metrics = {"val_acc": 0.75}
    back = Skill.from_bytes(skill.to_bytes())
    assert back.metadata == skill.metadata
    assert set(back.regions) == set(skill.regions)
    for name, region in skill.regions.items():
        assert torch.equal(back.regions[name].indices, region.indices)
        assert torch.equal(back.regions[name].values, region.values)
    for name, tensor in skill.head.items():
        assert torch.equal(back.head[name], tensor)


def test_bf16_values_halve_the_value_bytes(base_model):
    skill = make_skill(base_model, "t", seed=1, sparsity=0.2)
    fp32 = len(skill.to_bytes())
    skill.metadata.value_dtype = "bfloat16"
    back = Skill.from_bytes(skill.to_bytes())
    assert len(skill.to_bytes()) < fp32 - skill.num_entries * 2 + 4096
    for name, region in skill.regions.items():
        torch.testing.assert_close(back.regions[name].values, region.values.bfloat16().float())


def test_truncated_file_is_refused(base_model, tmp_path):
    data = make_skill(base_model, "t", seed=1).to_bytes()
    with pytest.raises(SkillFileError, match="truncated or corrupted"):
        Skill.from_bytes(data[: len(data) // 2], origin="x.safetensors")


def test_plain_safetensors_is_not_a_skill():
    with pytest.raises(SkillFileError, match="not a skill"):
        Skill.from_bytes(save({"w": torch.ones(2)}))


def test_header_that_is_not_an_object_is_refused():
    with pytest.raises(SkillFileError, match="not a JSON object"):
        Skill.from_bytes(save({"w": torch.ones(2)}, metadata={"skillbank": "[1, 2]"}))


def test_newer_format_version_is_refused(base_model):
    skill = make_skill(base_model, "t", seed=1)
    skill.metadata.format_version = 99
    with pytest.raises(SkillFileError, match="newer.*upgrade"):
        Skill.from_bytes(skill.to_bytes())


def test_metadata_round_trips_through_json():
    meta = SkillMetadata("n", "f" * 64, 0.01, {"w": [2, 3]}, metrics={"acc": 0.5}, settings={"k": 1})
    assert SkillMetadata.from_json(meta.to_json()) == meta
    assert json.loads(meta.to_json())["format_version"] == 1

"""Skills that keep a few examples: exact round trips, format versions, bounded and checked reads."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, save

from helpers.models import make_skill
from skillbank import Skill, SkillBank, SkillFileError
from skillbank.localization.fewshot import examples_from_batches
from skillbank.storage.examples import MAX_EXAMPLES, Examples


def _examples(count: int = 6, width: int = 5) -> Examples:
    ids = torch.arange(count * width, device="cpu").reshape(count, width) % 97 + 3
    mask = torch.ones(count, width, dtype=torch.int64, device="cpu")
    mask[0, -2:] = 0
    return Examples({"input_ids": ids, "attention_mask": mask}, torch.arange(count, device="cpu") % 3)


def _header(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["skillbank"])


def test_examples_round_trip_exactly_and_raise_the_format_to_2(base_model):
    skill = replace(make_skill(base_model, "t", seed=1), examples=_examples())
    data = skill.to_bytes()
    back = Skill.from_bytes(data)
    assert _header(data)["format_version"] == 2
    assert back.examples is not None and set(back.examples.inputs) == {"input_ids", "attention_mask"}
    for name, tensor in skill.examples.inputs.items():
        assert torch.equal(back.examples.inputs[name], tensor) and back.examples.inputs[name].dtype == torch.int64
    assert torch.equal(back.examples.labels, skill.examples.labels)
    assert back.examples.summary() == "6 examples, 3 classes, 5 tokens each"
    for name, region in skill.regions.items():
        assert torch.equal(back.regions[name].values, region.values)


def test_a_skill_without_examples_stays_at_format_1(base_model):
    data = make_skill(base_model, "t", seed=1).to_bytes()
    assert _header(data)["format_version"] == 1
    assert Skill.from_bytes(data).examples is None


def test_unlabelled_examples_round_trip(base_model):
    examples = Examples({"input_ids": torch.tensor([[4, 5, 6]])})
    back = Skill.from_bytes(replace(make_skill(base_model, "t", seed=1), examples=examples).to_bytes()).examples
    assert back.labels is None and back.summary() == "1 examples, unlabelled, 3 tokens each"
    assert list(back.batches()[0]) == ["input_ids"]


def _crafted(base_model, edit) -> bytes:
    data = replace(make_skill(base_model, "t", seed=1), examples=_examples()).to_bytes()
    tensors = load(data)
    edit(tensors)
    return save(tensors, metadata={"skillbank": json.dumps(_header(data))})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"examples/inputs/input_ids": t["examples/inputs/input_ids"].float()}), "2-D integer"),
        (lambda t: t.update({"examples/labels": -t["examples/labels"] - 1}), "class indices"),
        (lambda t: t.update({"examples/labels": t["examples/labels"][:2]}), "labels must be 6 integers"),
        (lambda t: t.update({"examples/inputs/attention_mask": torch.ones(6, 4, dtype=torch.uint8)}), "shapes differ"),
        (lambda t: t.update({"examples/inputs/Bad-Name": torch.ones(6, 5, dtype=torch.int32)}), "plain lower-case"),
        (lambda t: t.update({"examples/other": torch.ones(6, dtype=torch.int32)}), "unexpected tensor"),
        (lambda t: t.update({"examples/inputs/input_ids": torch.full((6, 5), -4, dtype=torch.int32)}), r"outside \[0"),
        (
            lambda t: t.update(
                {
                    "examples/inputs/input_ids": torch.ones(MAX_EXAMPLES + 1, 1, dtype=torch.uint8),
                    "examples/inputs/attention_mask": torch.ones(MAX_EXAMPLES + 1, 1, dtype=torch.uint8),
                    "examples/labels": torch.zeros(MAX_EXAMPLES + 1, dtype=torch.int64),
                }
            ),
            "at most 4096",
        ),
    ],
)
def test_crafted_examples_are_refused_naming_the_file(base_model, edit, message):
    with pytest.raises(SkillFileError, match=message) as caught:
        Skill.from_bytes(_crafted(base_model, edit), origin="crafted.safetensors")
    assert "crafted.safetensors" in str(caught.value)


def test_examples_in_a_file_that_declares_format_1_are_refused(base_model):
    data = replace(make_skill(base_model, "t", seed=1), examples=_examples()).to_bytes()
    header = {**_header(data), "format_version": 1}
    with pytest.raises(SkillFileError, match="declares format 1"):
        Skill.from_bytes(save(load(data), metadata={"skillbank": json.dumps(header)}))


def test_examples_from_batches_keep_a_seeded_balanced_padded_set():
    batches = [
        {
            "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
            "labels": torch.tensor([0, 1]),
        },
        {"input_ids": torch.tensor([[3, 4], [2, 2]]), "attention_mask": torch.ones(2, 2), "labels": torch.tensor([0, 0])},
    ]
    batches[1]["attention_mask"] = batches[1]["attention_mask"].long()
    kept = examples_from_batches(batches, per_class=2, seed=0, pad_token_id=0)
    assert sorted(kept.labels.tolist()) == [0, 0, 1]  # two of the three zeros, the only one
    assert kept.length == 3 and len(kept) == 3
    again = examples_from_batches(batches, per_class=2, seed=0)
    assert torch.equal(again.inputs["input_ids"], kept.inputs["input_ids"])
    short = [i for i, row in enumerate(kept.inputs["input_ids"].tolist()) if row[:2] in ([3, 4], [2, 2])]
    for i in short:  # a two-token example is padded, and masked, in its third place
        assert kept.inputs["input_ids"][i, 2] == 0 and kept.inputs["attention_mask"][i, 2] == 0


def test_a_bank_keeps_the_examples_and_replace_drops_them(base_model, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    skill = replace(make_skill(base_model, "t", seed=1), examples=_examples())
    bank.add(skill)
    assert torch.equal(bank.get("t").examples.inputs["input_ids"], skill.examples.inputs["input_ids"])
    bank.replace(replace(bank.get("t"), examples=None))
    dropped = bank.get("t")
    assert dropped.examples is None and dropped.metadata.source["versions"] == 1
    for name, region in skill.regions.items():
        assert torch.equal(dropped.regions[name].values, region.values)
    assert bank.verify() == {"t": "ok"}

"""Every step of the data path names the device of each tensor it makes, whatever torch's default device is.

``with torch.device("cuda"):`` (or ``torch.set_default_device``) is how many people build
models straight onto a GPU; a step that made a tensor without naming its device would
then put it on the GPU beside data on the CPU, and fail or copy behind the user's back.
Each test runs with the default device set to ``meta``, where a tensor holds no data:
a tensor made without a device ends there and the step fails the same way, so CI
guards on the CPU what a GPU default would break. Where a GPU is present the tests run
with ``cuda`` as the default too (``pytest -m cuda``).
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from helpers.models import finetune_like, learned, live_copy, make_skill, reference_stitch
from skillbank import MaskLearner, Skill, SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.comparison.baselines import magmax, opcm, task_arithmetic, ties
from skillbank.localization.fewshot import balanced_indices
from skillbank.localization.streaming import localize_streaming
from skillbank.sparse import decode_indices, encode_indices
from skillbank.stitching.routing import SkillRouter, centroids, with_routing
from skillbank.stitching.stitch_out import stitch_to_folder
from skillbank.stitching.switching import group_by_skill
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset

ROOT = Path(__file__).resolve().parents[1]
#: torch's functions that make a tensor on the default device unless told another
FACTORIES = set("arange as_tensor empty eye full linspace ones rand randint randn randperm tensor zeros".split())


@pytest.fixture(
    params=[
        "meta",
        pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    ]
)
def default(request: pytest.FixtureRequest) -> str:
    """The default device the test sets around the steps it checks."""
    return request.param


def test_every_tensor_the_package_makes_names_its_device() -> None:
    """The rule these tests check at run time, over every line of the package (doctests aside): a path no test
    takes cannot make a tensor on the default device either."""
    unnamed = []
    for path in sorted([*(ROOT / "skillbank").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(keyword.arg == "device" for keyword in node.keywords)
            ):
                unnamed.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.func.attr}(...) without device=")
    assert not unnamed, "\n".join(unnamed)


def same_skill(a, b) -> None:  # noqa: ANN001
    recorded = [json.loads(skill.metadata.to_json()) for skill in (a, b)]
    for fields in recorded:
        del fields["created"]  # when each was made
    assert recorded[0] == recorded[1]
    assert sorted(a.regions) == sorted(b.regions)
    for name, region in a.regions.items():
        assert region.indices.device.type == region.values.device.type == "cpu"
        assert torch.equal(region.indices, b.regions[name].indices), name
        assert torch.equal(region.values, b.regions[name].values), name


def test_task_vectors_and_dataless_skills_are_made_on_the_cpu(default: str, base_model, tmp_path) -> None:
    finetuned = finetune_like(base_model, seed=1)
    finetuned.save_pretrained(tmp_path / "ft")
    base_model.save_pretrained(tmp_path / "base")
    expected = localize_dataless(task_vector(base_model, finetuned), 0.05, name="a", exclude=["embeddings"])
    streamed = localize_streaming(tmp_path / "base", tmp_path / "ft", 0.05, name="a", exclude=["embeddings"])
    with torch.device(default):
        tv = task_vector(base_model, tmp_path / "ft")
        assert {t.device.type for t in [*tv.shared.values(), *tv.head.values()]} == {"cpu"}
        same_skill(localize_dataless(tv, 0.05, name="a", exclude=["embeddings"]), expected)
        same_skill(localize_streaming(tmp_path / "base", tmp_path / "ft", 0.05, name="a", exclude=["embeddings"]), streamed)


def test_skills_go_into_a_bank_and_come_back(default: str, base_model, tmp_path) -> None:
    skill = make_skill(base_model, "a", seed=1)
    positions = torch.tensor([0, 5, 70_000, 200_001, 3_000_000])  # more than one 65,536-entry block
    with torch.device(default):
        bank = SkillBank(tmp_path / "bank")
        bank.add(skill)
        same_skill(bank.get("a"), skill)
        assert torch.equal(decode_indices(encode_indices(positions, 4_000_000), 4_000_000), positions)


def test_stitching_adds_removes_switches_and_resets_bitwise(default: str, base_model) -> None:
    skills = [make_skill(base_model, name, seed=i + 1) for i, name in enumerate("abc")]
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    live = live_copy(base_model)
    with torch.device(default):
        stitcher = Stitcher(live, base)
        for skill in skills:
            stitcher.add(skill)
        prepared = stitcher.prepare(skills[1])
        stitcher.remove("b")
        stitcher.add(prepared)
        merged = {k: v.clone() for k, v in live.bert.state_dict().items()}
        with stitcher.active("a") as model:
            alone = {k: v.clone() for k, v in model.bert.state_dict().items()}
        stitcher.switch([])
        after_switch = {k: v.clone() for k, v in live.bert.state_dict().items()}
        stitcher.switch(skills[:2])
        stitcher.reset()
    for name, value in reference_stitch(base, skills).items():
        assert torch.equal(merged[name], value), name
    for name, value in reference_stitch(base, skills[:1]).items():
        assert torch.equal(alone[name], value), name
    for name, value in base.items():
        assert torch.equal(after_switch[name], value) and torch.equal(live.bert.state_dict()[name], value), name


def test_a_bank_is_stitched_into_a_folder(default: str, base_model, tmp_path) -> None:
    bank = SkillBank(tmp_path / "bank")
    for i, name in enumerate("ab"):
        bank.add(make_skill(base_model, name, seed=i + 1))
    save_file({k: v.contiguous() for k, v in base_model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    expected = stitch_to_folder(tmp_path / "base.safetensors", bank, ["a", "b"], tmp_path / "expected")
    with torch.device(default):
        out = stitch_to_folder(tmp_path / "base.safetensors", bank, ["a", "b"], tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()


def test_merging_baselines_give_the_same_merges(default: str, base_model) -> None:
    taus = [task_vector(base_model, finetune_like(base_model, seed=s)).shared for s in (1, 2, 3)]
    merges = (task_arithmetic, lambda t: ties(t, density=0.2), magmax, opcm)
    expected = [merge(taus) for merge in merges]
    with torch.device(default):
        got = [merge(taus) for merge in merges]
    for want, have in zip(expected, got):
        assert {t.device.type for t in have.values()} == {"cpu"}
        for name in want:
            assert torch.equal(want[name], have[name]), name


def test_routing_picks_the_same_skills(default: str, base_model) -> None:
    generator = torch.Generator().manual_seed(0)
    features = {n: torch.randn(12, 16, generator=generator) * 0.3 + torch.eye(16)[i] for i, n in enumerate("ab")}
    skills = [with_routing(make_skill(base_model, n, seed=i + 1), centroids(f)) for i, (n, f) in enumerate(features.items())]
    expected = SkillRouter(skills).route(torch.cat(list(features.values())))
    with torch.device(default):
        router = SkillRouter(skills)
        assert router.route(torch.cat(list(features.values()))) == expected == ["a"] * 12 + ["b"] * 12


def test_masks_are_learned_in_context_and_examples_picked(default: str, base_model) -> None:
    context = [make_skill(base_model, "a", seed=7, sparsity=0.05)]
    finetuned = finetune_like(base_model, seed=4)
    ids, labels = DEMO_TASKS[0].sample(32, torch.Generator().manual_seed(0))
    # made here: a DataLoader draws its seed on the default device, and a meta tensor holds none
    data = list(DataLoader(TokenDataset(ids, labels), batch_size=16))

    def learn() -> Skill:
        torch.manual_seed(0)
        learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.05), context=context)  # writes its model
        return learner.learn(data, epochs=1, name="b")

    expected = learn()
    picked = balanced_indices(labels, 3, seed=1)
    grouped = group_by_skill(["a", "b", "a", "a", "b"], 2, shuffle=True, seed=1)
    with torch.device(default):
        same_skill(learn(), expected)
        assert balanced_indices(labels.tolist(), 3, seed=1) == picked
        assert group_by_skill(["a", "b", "a", "a", "b"], 2, shuffle=True, seed=1) == grouped

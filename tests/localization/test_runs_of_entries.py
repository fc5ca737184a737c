"""Skills of whole runs of entries (``block``): chosen by a run's summed |τ|, and switched run by run, bit for bit."""

from __future__ import annotations

import pytest
import torch

from helpers.models import finetune_like, live_copy
from skillbank import Stitcher, localize_dataless, task_vector
from skillbank.errors import TaskVectorError
from skillbank.stitching.single_skill import SingleSkillSwitcher, run_length
from skillbank.vectors.task_vectors import TaskVector


def _tv() -> TaskVector:
    """A hand-made task vector: a 2×5 matrix (runs of 4: entries 0–3, 4–7, 8–9) and a 3-entry bias."""
    matrix = torch.tensor([[0.1, -0.2, 0.0, 0.1, 3.0], [-0.1, 0.0, 0.1, 0.9, 0.9]])
    return TaskVector({"w": matrix, "b": torch.tensor([0.5, -0.5, 0.2])}, {}, "f" * 64)


def test_runs_are_chosen_by_their_summed_magnitude_and_a_short_last_run_counts_its_own_entries():
    tv = _tv()
    # runs of 4: w [0.4, 3.2, 1.8 (two entries)], b [1.2 (three)]; k = ceil(0.5 · 13) = 7: the runs of 3.2, 1.8, 1.2
    skill = localize_dataless(tv, 0.5, name="t", block=4)
    assert skill.regions["w"].indices.tolist() == [4, 5, 6, 7, 8, 9] and skill.regions["b"].indices.tolist() == [0, 1, 2]
    assert torch.equal(skill.regions["w"].values, tv.shared["w"].reshape(-1)[4:10])
    assert skill.metadata.settings["block"] == 4 and skill.metadata.settings["k"] == 9  # the fewest runs holding k
    assert localize_dataless(tv, 0.4, name="t", block=4).regions["b"].indices.tolist() == []  # 6 entries hold k = 6
    entries = localize_dataless(tv, 0.5, name="t")  # block 1 is the paper's mask, and records no block
    assert entries.regions["w"].indices.tolist() == [1, 4, 8, 9] and entries.regions["b"].indices.tolist() == [0, 1, 2]
    assert "block" not in entries.metadata.settings
    assert localize_dataless(tv, 1.0, name="t", block=8).num_entries == 13  # every run: every entry once
    with pytest.raises(TaskVectorError, match="block must be a whole number >= 1"):
        localize_dataless(tv, 0.5, name="t", block=0)


def test_run_length_is_the_longest_whole_aligned_run():
    assert run_length(torch.arange(64, 128), 256) == 64
    assert run_length(torch.cat([torch.arange(0, 16), torch.arange(48, 64)]), 64) == 16
    assert run_length(torch.arange(2, 18), 64) == 1  # not aligned
    assert run_length(torch.tensor([0, 1, 2, 4]), 8) == 1  # not whole
    assert run_length(torch.arange(0, 16), 18) == 1  # 18 is not cut in runs of 4 or more
    assert run_length(torch.arange(0, 4), 12) == 4
    assert run_length(torch.empty(0, dtype=torch.int64), 64) == 1


def test_a_skill_of_runs_is_switched_run_by_run_and_holds_what_the_stitcher_holds(base_model):
    def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("bert.")}

    def alone(skill) -> dict[str, torch.Tensor]:  # noqa: ANN001
        model = live_copy(base_model)
        Stitcher(model).add(skill)
        return state(model)

    runs = localize_dataless(task_vector(base_model, finetune_like(base_model, seed=1)), 0.2, name="runs", block=16)
    entries = localize_dataless(task_vector(base_model, finetune_like(base_model, seed=2)), 0.2, name="entries")
    model = live_copy(base_model)
    base = state(model)
    switcher = SingleSkillSwitcher(model)
    prepared = {s.name: switcher.prepare(s) for s in (runs, entries)}
    lengths = {part.run for part in prepared["runs"].parts}
    assert 16 in lengths and lengths <= {4, 16}  # a short last run is written in runs of 4 where they divide it
    assert {part.run for part in prepared["entries"].parts} == {1}
    assert all(part.indices.numel() * part.run == part.target.numel() for part in prepared["runs"].parts)
    for name in ("runs", "entries", "runs", "runs"):
        switcher.switch(prepared[name])
        expected = alone(runs if name == "runs" else entries)
        assert all(torch.equal(v, expected[k]) for k, v in state(model).items()), name
    late = switcher.prepare(entries)  # prepared while the runs are held: it reads the base under them
    assert all(torch.equal(a.base, b.base) for a, b in zip(late.parts, prepared["entries"].parts))
    switcher.switch(None)
    assert all(torch.equal(v, base[k]) for k, v in state(model).items())

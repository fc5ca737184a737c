"""The one-launch gather/scatter (skillbank.stitching.multi_tensor) writes what the per-tensor path writes, bit for bit.

Runs where Triton imports: on a CUDA device with compiled kernels, or on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``); skipped elsewhere (CI has no Triton).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from helpers.models import live_copy, make_skill
from skillbank import Stitcher
from skillbank.stitching import multi_tensor
from skillbank.stitching.stitcher import PreparedSkill

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytestmark = pytest.mark.cuda


class _Switch:
    """``multi_tensor.enabled`` as this device allows it (the CPU through the interpreter), turned off by ``on = False``;
    counts the scatters that ran."""

    def __init__(self) -> None:
        self.on, self.scatters, self._real, self._scatter = True, 0, multi_tensor.enabled, multi_tensor.scatter

    def enabled(self, tensors) -> bool:
        if not self.on:
            return False
        if DEVICE == "cuda":
            return self._real(tensors)
        return bool(tensors) and len({t.dtype for t in tensors}) == 1 and multi_tensor._kernels() is not None

    def scatter(self, *args) -> None:
        self.scatters += 1
        self._scatter(*args)


@pytest.fixture
def one_launch(monkeypatch) -> _Switch:
    """The one-launch path on this device (on the CPU too, through the interpreter)."""
    switch = _Switch()
    monkeypatch.setattr(multi_tensor, "enabled", switch.enabled)
    monkeypatch.setattr(multi_tensor, "scatter", switch.scatter)
    return switch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scatter_and_gather_reach_every_tensor(one_launch, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in (5, 1, 300, 17)]
    offsets = [0, 5, 6, 306]
    ids = torch.tensor([0, 0, 1, 2, 2, 3], dtype=torch.int32, device=DEVICE)
    positions = torch.tensor([1, 4, 5, 6, 305, 322], device=DEVICE)
    table = multi_tensor.AddressTable(tensors, offsets).current(torch.device(DEVICE), tensors[0].element_size())
    flat = torch.cat([t for t in tensors])
    select = torch.tensor([0, 3, 5], device=DEVICE)
    assert torch.equal(multi_tensor.gather(table, ids, positions, select, dtype), flat[positions[select]])
    values = torch.randn(6, generator=gen).to(DEVICE, dtype)
    multi_tensor.scatter(table, ids, positions, values)
    flat[positions] = values
    assert torch.equal(torch.cat(tensors), flat)


def test_the_table_follows_storage_that_moved(one_launch):
    tensors = [torch.zeros(4, device=DEVICE), torch.zeros(3, device=DEVICE)]
    addresses = multi_tensor.AddressTable(tensors, [0, 4])
    first = addresses.current(torch.device(DEVICE), 4).clone()
    tensors[1].data = torch.zeros(3, device=DEVICE)  # as model.to(...) or a reassigned .data does
    second = addresses.current(torch.device(DEVICE), 4)
    assert int(second[0]) == int(first[0]) and int(second[1]) == tensors[1].data_ptr() - 4 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stitching_with_one_launch_is_bitwise_the_per_tensor_result(base_model, one_launch, dtype):
    base_model = copy.deepcopy(base_model).to(dtype)  # skills of a `dtype` base
    skills = [make_skill(base_model, f"t{i}", seed=i, sparsity=0.1) for i in range(4)]
    first = live_copy(base_model).to(DEVICE, dtype)
    models = [first, copy.deepcopy(first)]
    base = {k: v.clone() for k, v in models[0].state_dict().items() if v.is_floating_point()}
    stitchers = [Stitcher(m) for m in models]
    steps = [("add", 0), ("add", 1), ("add", 2), ("remove", 1), ("add", 3), ("add", 1), ("remove", 0)]
    for op, i in steps:
        for on, stitcher in zip((True, False), stitchers):
            one_launch.on = on
            stitcher.add(skills[i]) if op == "add" else stitcher.remove(f"t{i}")
        for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
            assert torch.equal(a, b), (op, i, name)
    assert one_launch.scatters == len(steps)
    one_launch.on = True
    stitchers[0].switch([])
    for name, value in models[0].state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, base[name]), name


def test_prepared_skills_add_remove_and_switch_like_plain_ones(base_model, one_launch):
    skills = [make_skill(base_model, f"t{i}", seed=i, sparsity=0.1) for i in range(3)]
    plain = live_copy(base_model).to(DEVICE)
    fast = copy.deepcopy(plain)
    base = copy.deepcopy(plain.state_dict())
    plain_stitcher, fast_stitcher = Stitcher(plain), Stitcher(fast)
    prepared = [fast_stitcher.prepare(s) for s in skills]
    assert all(isinstance(p, PreparedSkill) and p.batch.placed.positions.device.type == DEVICE for p in prepared)
    for skill, ready in zip(skills, prepared):
        plain_stitcher.add(skill)
        fast_stitcher.add(ready)
    plain_stitcher.remove("t1")
    fast_stitcher.remove("t1")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    with fast_stitcher.active(prepared[1]):
        assert fast_stitcher.stitched == ["t1"]
    assert fast_stitcher.stitched == ["t0", "t2"]
    fast_stitcher.switch([])
    assert all(torch.equal(a, base[k]) for k, a in fast.state_dict().items())
    # both stitchers: 3 adds and a remove each; into active(): 2 out, 1 in; back: 1 out, 2 in; switch([]): 2 out
    assert one_launch.scatters == 2 * 4 + 3 + 3 + 2
    other = Stitcher(live_copy(base_model).to(DEVICE))
    with pytest.raises(Exception, match="prepared for another Stitcher"):
        other.add(prepared[0])

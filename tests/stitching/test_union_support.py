"""The Stitcher's union state: rows found by hashing, checked against a dense reference through rebuilds,
compaction and 64-bit positions; memory that follows the covered entries, not the model."""

from __future__ import annotations

import pytest
import torch

from skillbank import Region, Skill, SkillMetadata, Stitcher, StitchError, base_fingerprint
from skillbank.stitching import union_support
from skillbank.stitching.overlap import get_rule
from skillbank.stitching.union_support import UnionSupport


class DenseReference:
    """Base, cover count and running sum per position, in plain dicts: what the union state must agree with."""

    def __init__(self) -> None:
        self.base: dict[int, float] = {}
        self.count: dict[int, int] = {}
        self.sum: dict[int, float] = {}

    def apply(self, positions: torch.Tensor, values: torch.Tensor, sign: int) -> list[float]:
        out = []
        for p, v in zip(positions.tolist(), values.double().tolist()):
            self.base.setdefault(p, float(p % 7))
            self.count[p] = self.count.get(p, 0) + sign
            self.sum[p] = self.sum.get(p, 0.0) + sign * v if self.count[p] else 0.0
            out.append(self.base[p] + self.sum[p] / self.count[p] if self.count[p] else self.base[p])
        return out


def step(union: UnionSupport, positions: torch.Tensor, values: torch.Tensor, sign: int) -> torch.Tensor:
    """One plan + commit; the 'live model' holds position % 7 wherever nothing covers it."""
    plan = union.plan(positions, values, sign, lambda fresh: (positions[fresh] % 7).double())
    union.commit(plan)
    return plan.merged


@pytest.mark.parametrize("masked_rounds", [0, 2], ids=["cpu-rounds", "cuda-rounds"])
@pytest.mark.parametrize("numel, offset", [(10_000, 0), (2**33, 2**32)])
def test_random_adds_and_removes_match_a_dense_reference_through_rebuilds(monkeypatch, numel, offset, masked_rounds):
    monkeypatch.setattr(union_support, "_COMPACT_AFTER", 0)  # drop uncovered rows as soon as they dominate
    monkeypatch.setattr(union_support, "_masked_rounds", lambda device: masked_rounds)  # CUDA's way, on the CPU
    gen = torch.Generator().manual_seed(0)
    union = UnionSupport(numel, torch.device("cpu"), get_rule("mean"), torch.float64)
    assert union.key_dtype == (torch.int32 if numel < 2**31 else torch.int64)
    reference, stitched = DenseReference(), {}
    for i in range(60):
        if stitched and (torch.rand(1, generator=gen) < 0.4 or len(stitched) > 6):
            name = list(stitched)[int(torch.randint(len(stitched), (1,), generator=gen))]
            positions, values = stitched.pop(name)
            sign = -1
        else:
            size = int(torch.randint(1, 800, (1,), generator=gen))
            positions = offset + torch.randperm(3_000, generator=gen)[:size].sort().values  # overlapping skills
            values = torch.randn(size, generator=gen)
            stitched[i] = (positions, values)
            sign = 1
        merged = step(union, positions, values, sign)
        assert merged.tolist() == pytest.approx(reference.apply(positions, values, sign), abs=1e-12)
        assert union.covered() == sum(1 for c in reference.count.values() if c)
        # every covered position is found, with its own row
        covered = torch.tensor([p for p, c in reference.count.items() if c], dtype=torch.int64)
        rows, _ = union._find(covered)
        assert bool((rows >= 0).all()) and rows.unique().numel() == covered.numel()
        assert torch.equal(union.keys.index_select(0, rows).long(), covered)
    assert union.size < 3_000  # uncovered rows were dropped along the way


@pytest.mark.parametrize("numel", [1, 1_000, 2**31 - 1, 2**40 + 7])
@pytest.mark.parametrize("slots", [4, 2**12, 2**34])
def test_ascending_keys_start_their_probes_in_ascending_slots_inside_the_table(numel, slots):
    """The first probe keeps the address order (a skill's sorted positions read the table front to back) and
    never leaves the table, whatever the sizes (no int64 overflow)."""
    union = UnionSupport(numel, torch.device("cpu"), get_rule("mean"), torch.float32)
    union.table = torch.empty(1, dtype=torch.int8).expand(slots)  # only its size is read
    keys = torch.tensor(sorted({k for k in (0, 1, 2, numel // 3, numel // 2, numel - 2, numel - 1) if 0 <= k < numel}))
    home = union._home(keys.to(union.key_dtype))
    assert int(home.min()) >= 0 and int(home.max()) < slots
    assert bool((home[1:] >= home[:-1]).all())
    if numel >= slots:
        assert int(home[-1]) >= slots - 1 - slots // 1000  # the whole table is used, not a part of it


def test_a_table_that_fills_is_rebuilt_larger_and_finds_every_row_where_it_was():
    union = UnionSupport(1_000_000, torch.device("cpu"), get_rule("mean"), torch.float32)
    gen = torch.Generator().manual_seed(1)
    added = []
    for _ in range(6):  # each add fills the table past its load: a rebuild every time
        positions = torch.randperm(1_000_000, generator=gen)[:5_000].sort().values
        before_keys, slots = union.keys[: union.size].clone(), union.table.numel()
        step(union, positions, torch.ones(5_000), 1)
        added.append(positions)
        assert union.table.numel() >= slots
        assert torch.equal(union.keys[: before_keys.numel()], before_keys)  # earlier rows stay where they were
    covered = torch.cat(added).unique()
    rows, _ = union._find(covered)
    assert bool((rows >= 0).all()) and union.covered() == covered.numel() == union.size


def test_a_remove_of_entries_without_rows_is_refused():
    union = UnionSupport(100, torch.device("cpu"), get_rule("mean"), torch.float32)
    step(union, torch.tensor([1, 2]), torch.tensor([1.0, 1.0]), 1)
    with pytest.raises(StitchError, match="no record"):
        union.plan(torch.tensor([3]), torch.tensor([1.0]), -1, lambda fresh: fresh.double())


def one_tensor_skill(model: torch.nn.Module, name: str, indices: torch.Tensor, base: str | None = None) -> Skill:
    state = model.state_dict()
    meta = SkillMetadata(name, base or base_fingerprint(state), 0.01, {k: list(v.shape) for k, v in state.items()})
    return Skill(meta, {"weight": Region(indices, torch.full((indices.numel(),), 0.5))})


@pytest.mark.parametrize("rows", [200, 800])
def test_state_bytes_follow_the_covered_entries_not_the_model(rows):
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, rows, bias=False)  # 200k or 800k entries
    stitcher = Stitcher(model)
    stitcher.add(one_tensor_skill(model, "a", torch.arange(0, 20_000, 10)))  # 2,000 entries
    assert stitcher.covered == 2_000
    # rows (key 4 + base 4 + count 2 + sum 8 bytes, with spare room) and the table, not 4 bytes a model entry
    assert stitcher.state_nbytes <= 39 * 2_000
    assert Stitcher(model).state_nbytes == 0  # an empty stitcher holds nothing


def test_same_skill_on_a_larger_model_costs_the_same_state():
    sizes = []
    for rows in (200, 800):
        torch.manual_seed(0)
        model = torch.nn.Linear(1000, rows, bias=False)
        stitcher = Stitcher(model)
        stitcher.add(one_tensor_skill(model, "a", torch.arange(0, 20_000, 10)))
        sizes.append(stitcher.state_nbytes)
    assert sizes[0] == sizes[1]


def test_removed_skills_give_their_memory_back_and_the_base_bit_for_bit(monkeypatch):
    monkeypatch.setattr(union_support, "_COMPACT_AFTER", 0)
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100, bias=False)
    base, fingerprint = model.weight.detach().clone(), base_fingerprint(model.state_dict())
    stitcher = Stitcher(model)
    stitcher.add(one_tensor_skill(model, "big", torch.arange(0, 9_000), fingerprint))
    stitcher.add(one_tensor_skill(model, "small", torch.arange(8_990, 9_010), fingerprint))
    held = stitcher.state_nbytes
    stitcher.remove("big")  # 8,990 rows now cover nothing: they are dropped
    assert stitcher.covered == 20
    assert stitcher.state_nbytes < held / 10
    assert torch.equal(model.weight.reshape(-1)[:8_990], base.reshape(-1)[:8_990])
    assert torch.equal(model.weight.reshape(-1)[8_990:9_010], base.reshape(-1)[8_990:9_010] + 0.5)
    stitcher.remove("small")
    assert torch.equal(model.weight, base)


def test_more_overlapping_skills_than_the_count_holds_are_refused_with_the_model_unchanged(monkeypatch):
    monkeypatch.setattr(union_support, "_MAX_COUNT", 2)
    model = torch.nn.Linear(4, 4, bias=False)
    stitcher, fingerprint = Stitcher(model), base_fingerprint(model.state_dict())
    for name in ("a", "b"):
        stitcher.add(one_tensor_skill(model, name, torch.tensor([1, 2]), fingerprint))
    before = model.weight.detach().clone()
    with pytest.raises(StitchError, match="more than 2 skills would cover one entry"):
        stitcher.add(one_tensor_skill(model, "c", torch.tensor([2, 3]), fingerprint))
    assert torch.equal(model.weight, before) and stitcher.stitched == ["a", "b"]


def test_a_rebuild_that_fails_leaves_the_state_as_it_was(monkeypatch):
    union = UnionSupport(1_000, torch.device("cpu"), get_rule("mean"), torch.float64)
    step(union, torch.arange(0, 600, 3), torch.ones(200), 1)
    before = (union.keys.clone(), union.table.clone(), union.size, union.live)

    def out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003
        raise MemoryError("no room")

    monkeypatch.setattr(union, "_insert", out_of_memory)
    with pytest.raises(MemoryError):
        union._rebuild(0)
    assert torch.equal(union.keys, before[0]) and torch.equal(union.table, before[1])
    assert (union.size, union.live) == before[2:]
    monkeypatch.undo()
    rows, _ = union._find(torch.arange(0, 600, 3))
    assert bool((rows >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_written_values_are_the_float64_formula_cast_bit_for_bit(dtype):
    """What the position map wrote: base + the float64 mean of the covering τ, cast to the model's dtype."""
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 40, bias=False).to(dtype)
    base = model.weight.detach().clone()
    fingerprint = base_fingerprint(model.state_dict())
    skills = []
    for name, indices, seed in (("a", torch.arange(0, 1_500, 2), 1), ("b", torch.arange(0, 1_500, 3), 2)):
        values = torch.randn(indices.numel(), generator=torch.Generator().manual_seed(seed)) * 1e-2
        meta = SkillMetadata(name, fingerprint, 0.5, {"weight": [40, 50]})
        skills.append(Skill(meta, {"weight": Region(indices, values)}))
    stitcher = Stitcher(model)
    for skill in skills:
        stitcher.add(skill)
    total, count = torch.zeros(2_000, dtype=torch.float64), torch.zeros(2_000, dtype=torch.float64)
    for skill in skills:
        region = skill.regions["weight"]
        total[region.indices] += region.values.double()
        count[region.indices] += 1
    flat = base.reshape(-1).double()
    want = torch.where(count > 0, flat + total / count.clamp(min=1), flat).to(dtype)
    assert torch.equal(model.weight.detach().reshape(-1), want)
    stitcher.remove("a")
    stitcher.remove("b")
    assert torch.equal(model.weight, base)

"""Pure functions against plain reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skillbank.errors import SkillbankError
from skillbank.sparse import check_sparsity, decode_indices, encode_indices, global_top_runs, global_topk, num_selected


def reference_topk(scores: dict, k: int) -> dict:
    """Sort every (value, position) pair: largest value first, earliest position on ties."""
    flat, offset = [], 0
    for name, t in scores.items():
        values = t.reshape(-1).tolist()
        flat += [(-v, offset + i, name, i) for i, v in enumerate(values)]
        offset += len(values)
    chosen = sorted(flat)[:k]
    return {name: sorted(i for _, _, n, i in chosen if n == name) for name in scores}


small_values = st.integers(-3, 3).map(float)  # many ties


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    data=st.data(),
)
def test_global_topk_matches_reference_with_ties(sizes, data):
    scores = {f"p{i}": torch.tensor(data.draw(st.lists(small_values, min_size=n, max_size=n))) for i, n in enumerate(sizes)}
    k = data.draw(st.integers(1, sum(sizes)))
    got = global_topk(scores, k)
    assert {n: v.tolist() for n, v in got.items()} == reference_topk(scores, k)
    assert sum(v.numel() for v in got.values()) == k


def reference_top_runs(scores: dict, k: int, block: int) -> dict:
    """Every run with its sum, largest first, earliest on ties; the shortest prefix holding k entries."""
    runs, order = [], 0
    for name, t in scores.items():
        values = t.reshape(-1).tolist()
        for start in range(0, len(values), block):
            runs.append((-sum(values[start : start + block]), order, name, range(start, min(start + block, len(values)))))
            order += 1
    chosen, held = [], 0
    for run in sorted(runs):
        if held >= k:
            break
        chosen.append(run)
        held += len(run[3])
    return {name: sorted(i for *_, n, entries in chosen if n == name for i in entries) for name in scores}


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4), block=st.integers(1, 8), data=st.data())
def test_global_top_runs_matches_reference_with_ties_and_short_last_runs(sizes, block, data):
    scores = {f"p{i}": torch.tensor(data.draw(st.lists(small_values, min_size=n, max_size=n))) for i, n in enumerate(sizes)}
    k = data.draw(st.integers(1, sum(sizes)))
    got = global_top_runs(scores, k, block)
    assert {n: v.tolist() for n, v in got.items()} == reference_top_runs(scores, k, block)
    assert sum(v.numel() for v in got.values()) >= k
    if block == 1:
        assert all(torch.equal(got[n], v) for n, v in global_topk(scores, k).items())


def test_global_topk_rejects_impossible_k():
    with pytest.raises(SkillbankError):
        global_topk({"a": torch.ones(3)}, 4)


@settings(max_examples=200, deadline=None)
@given(numel=st.sampled_from([1, 200, 256, 257, 5000, 65536, 65537, 300_000]), data=st.data())
def test_index_codes_round_trip(numel, data):
    count = data.draw(st.integers(0, min(numel, 300)))
    idx = torch.randperm(numel, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))[:count].sort().values
    codes = encode_indices(idx, numel)
    assert torch.equal(decode_indices(codes, numel), idx)


def test_index_code_sizes_are_compact():
    assert encode_indices(torch.tensor([0, 255]), 256)["idx"].dtype == torch.uint8
    assert encode_indices(torch.tensor([0, 65535]), 65536)["idx"].dtype == torch.uint16
    numel = 10_000_000
    idx = torch.randperm(numel)[: numel // 100].sort().values
    codes = encode_indices(idx, numel)
    nbytes = sum(c.numel() * c.element_size() for c in codes.values())
    assert nbytes / idx.numel() < 2.05  # 2 bytes per entry plus block counts


def test_decode_rejects_damaged_codes():
    with pytest.raises(SkillbankError, match="ascending"):
        decode_indices({"idx": torch.tensor([3, 1], dtype=torch.uint8)}, 10)
    with pytest.raises(SkillbankError, match="ascending"):
        decode_indices({"idx": torch.tensor([3, 12], dtype=torch.uint8)}, 10)
    with pytest.raises(SkillbankError, match="block counts"):
        decode_indices({"lo": torch.zeros(2, dtype=torch.uint16), "blk": torch.tensor([5, 0], dtype=torch.int32)}, 70_000)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(SkillbankError, match=r"\(0, 1\]"):
        check_sparsity(bad)


@pytest.mark.parametrize("s,total", [(0.01, 123_456), (0.07, 100), (1.0, 17), (0.333, 1000), (1e-5, 10)])
def test_num_selected_is_ceil_of_s_times_p(s, total):
    from fractions import Fraction

    assert num_selected(s, total) == max(1, math.ceil(Fraction(str(s)) * total))

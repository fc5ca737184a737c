"""TSV-M, Iso-C and Iso-CTS against small hand computations; the merge registry."""

from __future__ import annotations

import pytest
import torch

from skillbank.comparison.merges import MERGES, Merge, get_merge, register_merge
from skillbank.comparison.spectral import iso_c, iso_cts, tsv_m
from skillbank.errors import SkillbankError, TaskVectorError
from skillbank.vectors.spectral import nearest_orthonormal


def _diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values))


def _random(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": torch.randn(6, 4, generator=g),
            "layer.bias": torch.randn(6, generator=g),
            "embeddings.word_embeddings.weight": torch.randn(9, 4, generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("merge", [tsv_m, iso_cts])
def test_one_task_gives_its_own_matrix_back(merge):
    tau = _random(1)[0]
    if merge is iso_cts:  # it flattens the spectrum: a matrix whose singular values are all equal comes back
        tau["layer.weight"] = torch.linalg.qr(tau["layer.weight"]).Q * 3.0
    merged = merge([tau])
    for name, tensor in tau.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-5)


def test_tsv_m_of_tasks_in_orthogonal_directions_is_their_sum():
    # rank 4, two tasks: each keeps its top 4 // 2 = 2 directions, which are all it has; nothing to decorrelate
    taus = [{"w": _diag(4.0, 1.0, 0.0, 0.0)}, {"w": _diag(0.0, 0.0, 3.0, 2.0)}]
    torch.testing.assert_close(tsv_m(taus)["w"], _diag(4.0, 1.0, 3.0, 2.0))
    torch.testing.assert_close(tsv_m(taus, scale=0.5)["w"], _diag(2.0, 0.5, 1.5, 1.0))


def test_tsv_m_keeps_each_tasks_top_share_of_the_rank():
    # each task keeps 1 of its 2 directions: task 1 its 5 along e1, task 2 its 3 along e2 (not its 2 along e1)
    taus = [{"w": _diag(5.0, 1.0)}, {"w": _diag(2.0, 3.0)}]
    torch.testing.assert_close(tsv_m(taus)["w"], _diag(5.0, 3.0))


def test_tsv_m_decorrelates_overlapping_directions():
    # two tasks along directions 45° apart: the stacked left vectors are replaced by the nearest orthonormal pair
    c = 2**-0.5
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([c, c])
    v = torch.eye(2)
    taus = [{"w": 2.0 * torch.outer(u1, v[0])}, {"w": 2.0 * torch.outer(u2, v[1])}]
    merged = tsv_m(taus)["w"]
    expected_u = nearest_orthonormal(torch.stack([u1, u2], 1))
    torch.testing.assert_close(merged, 2.0 * expected_u)  # V is already orthonormal: Σ = 2·I, U decorrelated
    torch.testing.assert_close(expected_u.T @ expected_u, torch.eye(2), atol=1e-6, rtol=0)
    assert torch.linalg.svdvals(merged).allclose(torch.tensor([2.0, 2.0]))  # the sum would have 2.61 and 1.08


def test_iso_c_flattens_the_spectrum_of_the_sum():
    taus = [{"w": _diag(3.0, 1.0)}, {"w": _diag(1.0, 1.0)}]  # sum diag(4, 2): mean singular value 3
    torch.testing.assert_close(iso_c(taus)["w"], _diag(3.0, 3.0))
    random = _random(3)
    merged = iso_c(random, scale=2.0)["layer.weight"]
    total = sum(t["layer.weight"] for t in random)
    singular = torch.linalg.svdvals(merged)
    torch.testing.assert_close(singular, torch.full((4,), 2.0 * float(torch.linalg.svdvals(total).mean())))
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged, 2.0 * float(torch.linalg.svdvals(total).mean()) * u @ vh)  # the sum's directions


def test_iso_cts_adds_each_tasks_own_directions_outside_the_common_ones():
    # rank 4, two tasks, common fraction 0.5: the sum diag(4, 3, 2, 1)'s top 2 directions (e1, e2) are common;
    # task 1 adds its top direction outside them (e3, 2), task 2 its own (e4, 1); every direction gets the mean 2.5
    taus = [{"w": _diag(4.0, 0.0, 2.0, 0.0)}, {"w": _diag(0.0, 3.0, 0.0, 1.0)}]
    torch.testing.assert_close(iso_cts(taus, common_fraction=0.5)["w"], _diag(2.5, 2.5, 2.5, 2.5))
    # a common fraction of 0.75 leaves 4 - 3 = 1 direction for 2 tasks: round(1 / 2) = 0 each, which is Iso-C
    torch.testing.assert_close(iso_cts(taus, common_fraction=0.75)["w"], iso_c(taus)["w"])


def test_iso_cts_is_iso_c_at_a_common_fraction_of_one_and_has_a_flat_spectrum():
    taus = _random(3, seed=1)
    for name in ("layer.weight", "layer.bias", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(iso_cts(taus, common_fraction=1.0)[name], iso_c(taus)[name])
    singular = torch.linalg.svdvals(iso_cts(taus, common_fraction=0.5)["layer.weight"])
    torch.testing.assert_close(singular, singular.mean().expand(4))
    with pytest.raises(TaskVectorError, match="common_fraction must be in"):
        iso_cts(taus, common_fraction=0.0)


@pytest.mark.parametrize("merge", [tsv_m, iso_c, iso_cts])
def test_every_other_tensor_is_averaged_and_embeddings_are_not_matrices(merge):
    taus = _random(3, seed=2)
    merged = merge(taus, scale=1.5)
    for name in ("layer.bias", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(merged[name], 1.5 * torch.stack([t[name] for t in taus]).mean(0))
    assert not torch.allclose(merged["layer.weight"], 1.5 * torch.stack([t["layer.weight"] for t in taus]).mean(0))
    everything = merge(taus, matrices=lambda name, t: t.dim() == 2)  # a caller may say which tensors are matrices
    assert not torch.allclose(everything["embeddings.word_embeddings.weight"], merged["embeddings.word_embeddings.weight"])


def test_tsv_m_with_more_tasks_than_the_rank_keeps_one_direction_each():
    taus = [{"w": _diag(float(i + 1), 0.5)} for i in range(3)]  # rank 2, three tasks
    merged = tsv_m(taus)["w"]
    assert merged.shape == (2, 2) and torch.isfinite(merged).all()


def test_every_registered_merge_is_linear_in_its_scale_and_named():
    taus = _random(3, seed=3)
    assert {"task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "magmax", "consensus", "average"} <= set(MERGES)
    for name, merge in MERGES.items():
        unit, scaled = merge(taus), merge(taus, 0.7)
        for tensor in unit:
            torch.testing.assert_close(scaled[tensor], 0.7 * unit[tensor], msg=name)
        assert merge.scales and all(s > 0 for s in merge.scales), name
    torch.testing.assert_close(get_merge("tsv_m")(taus, 2.0)["layer.weight"], tsv_m(taus, 2.0)["layer.weight"])
    with pytest.raises(SkillbankError, match="unknown merge 'median'; known: average, consensus, iso_c"):
        get_merge("median")
    with pytest.raises(SkillbankError, match="a merge named 'tsv_m' is registered already"):
        register_merge(Merge("tsv_m", "again", "", tsv_m, (1.0,)))

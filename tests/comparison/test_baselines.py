"""Merging baselines against plain per-entry reference code."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from skillbank.comparison.baselines import average, consensus, tall_masks, task_arithmetic, ties, trim_top
from skillbank.errors import TaskVectorError
from skillbank.vectors.models import apply_delta


def _taus(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(n)]


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d["a"].reshape(-1), d["b"]])


def test_average_and_task_arithmetic() -> None:
    taus = _taus()
    for name in ("a", "b"):
        torch.testing.assert_close(average(taus)[name], (taus[0][name] + taus[1][name] + taus[2][name]) / 3)
        torch.testing.assert_close(task_arithmetic(taus, 0.4)[name], 0.4 * (taus[0][name] + taus[1][name] + taus[2][name]))


def test_trim_top_keeps_the_global_top_fraction() -> None:
    tau = _taus(1)[0]
    kept = _flat(trim_top(tau, 0.2))
    flat = _flat(tau)
    k = 6  # ceil(0.2 * 27)
    assert int((kept != 0).sum()) == k
    assert set(torch.nonzero(kept).squeeze(1).tolist()) == set(flat.abs().topk(k).indices.tolist())


def _ties_reference(taus: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    trimmed = []
    for t in taus:
        k = -(-int(density * t.numel() * 1000) // 1000)  # ceil without float noise for these sizes
        keep = set(t.abs().topk(k).indices.tolist())
        trimmed.append([float(t[i]) if i in keep else 0.0 for i in range(t.numel())])
    out = []
    for i in range(taus[0].numel()):
        column = [row[i] for row in trimmed]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agree = [v for v in column if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.append(scale * sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out)


@pytest.mark.parametrize("density,scale", [(0.2, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_ties_matches_the_reference(density: float, scale: float) -> None:
    taus = _taus(4, seed=3)
    merged = _flat(ties(taus, density, scale))
    torch.testing.assert_close(merged, _ties_reference([_flat(t) for t in taus], density, scale))


def test_tall_masks_and_consensus_match_the_reference() -> None:
    taus = _taus(4, seed=5)
    flats = [_flat(t) for t in taus]
    total = sum(flats)
    masks = [_flat({k: v.float() for k, v in m.items()}) for m in tall_masks(taus, 0.4)]
    for t, m in zip(flats, masks):
        expected = [float(abs(t[i]) >= 0.4 * abs(total[i] - t[i])) for i in range(t.numel())]
        assert m.tolist() == expected
    votes = sum(masks)
    merged = _flat(consensus(taus, k=2, lam=0.4, scale=0.5))
    torch.testing.assert_close(merged, 0.5 * total * (votes >= 2))
    assert 0 < int((votes >= 2).sum()) < total.numel()  # the test exercises both kept and dropped entries


def test_consensus_with_k_1_and_no_lambda_is_task_arithmetic() -> None:
    taus = _taus()
    for name in ("a", "b"):
        torch.testing.assert_close(consensus(taus, k=1, lam=0.0, scale=0.3)[name], task_arithmetic(taus, 0.3)[name])


def test_mismatched_task_vectors_are_refused() -> None:
    taus = _taus(2)
    taus[1] = {"a": taus[1]["a"]}
    with pytest.raises(TaskVectorError, match="other parameters"):
        average(taus)
    with pytest.raises(TaskVectorError, match="no task vectors"):
        ties([])
    with pytest.raises(TaskVectorError, match="2 lambdas for 3"):
        tall_masks(_taus(3), [0.1, 0.2])


def test_apply_delta_sets_base_plus_delta_and_resets() -> None:
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = BertModel(config)
    base = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    name = "encoder.layer.0.output.dense.weight"
    delta = {name: torch.ones_like(base[name])}
    apply_delta(model, base, delta)
    torch.testing.assert_close(model.state_dict()[name], base[name] + 1)
    assert torch.equal(model.state_dict()["pooler.dense.weight"], base["pooler.dense.weight"])
    apply_delta(model, base, {})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    with pytest.raises(TaskVectorError, match="no tensor"):
        apply_delta(model, base, {"nope.weight": torch.zeros(1)})


def test_magmax_takes_the_largest_magnitude_per_entry() -> None:
    from skillbank.comparison.baselines import magmax

    taus = _taus(4, seed=3)
    merged = _flat(magmax(taus, 0.5))
    flats = [_flat(t) for t in taus]
    for i in range(merged.numel()):
        values = [f[i].item() for f in flats]
        best = max(values, key=abs)  # max() keeps the first of equal keys: the earliest task wins ties
        assert merged[i].item() == pytest.approx(0.5 * best)


def _opcm_reference(taus: list[dict[str, torch.Tensor]], alpha: float) -> list[dict[str, torch.Tensor]]:
    """OPCM written with explicit outer products: keep u_i v_jᵀ components unless i == j or both i, j < r."""
    import numpy as np

    out, total, norms = [], None, []
    for tau in taus:
        norms.append(np.sqrt(sum(float((t.double() ** 2).sum()) for t in tau.values())))
        if total is None:
            total = {k: v.double().numpy().copy() for k, v in tau.items()}
        else:
            for k, v in tau.items():
                v = v.double().numpy()
                if v.ndim == 2:
                    u, s, vt = np.linalg.svd(total[k], full_matrices=True)
                    r = next(i for i in range(len(s)) if s[: i + 1].sum() / s.sum() > alpha)
                    kept = np.zeros_like(v)
                    for i in range(u.shape[1]):
                        for j in range(vt.shape[0]):
                            if i == j or (i < r and j < r):
                                continue
                            kept += (u[:, i] @ v @ vt[j]) * np.outer(u[:, i], vt[j])
                    v = kept
                total[k] = total[k] + v
        norm = np.sqrt(sum((t**2).sum() for t in total.values()))
        out.append({k: torch.from_numpy(t * (np.mean(norms) / norm)).float() for k, t in total.items()})
    return out


def test_opcm_matches_a_plain_reference_after_every_arrival() -> None:
    from skillbank.comparison.baselines import opcm, opcm_steps

    taus = _taus(4, seed=5)
    steps = list(opcm_steps(taus, alpha=0.5, matrices=lambda name, t: t.dim() == 2))
    expected = _opcm_reference(taus, 0.5)
    assert len(steps) == 4
    for got, want in zip(steps, expected):
        for name in ("a", "b"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[0]["a"], taus[0]["a"])  # the first task arrives as it is
    mean_norm = sum(float(_flat(t).norm()) for t in taus) / 4
    assert float(_flat(steps[-1]).norm()) == pytest.approx(mean_norm, rel=1e-5)  # adaptive scaling
    torch.testing.assert_close(opcm(taus, 0.5, lambda name, t: t.dim() == 2)["a"], steps[-1]["a"])
    with pytest.raises(TaskVectorError, match="alpha"):
        opcm(taus, alpha=1.0)


def test_arrivals_runs_a_one_shot_merger_on_every_prefix() -> None:
    from skillbank.comparison.baselines import arrivals

    taus = _taus(3)
    runs = list(arrivals(lambda ts: ties(ts, 0.5, 1.0), taus))
    for t, merged in enumerate(runs, 1):
        torch.testing.assert_close(merged["a"], ties(taus[:t], 0.5, 1.0)["a"])

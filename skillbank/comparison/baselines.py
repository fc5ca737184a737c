"""Model-merging baselines on task vectors: simple averaging, task arithmetic, TIES-merging, consensus (TALL masks),
and the continual mergers MagMax and OPCM.

Each function takes the shared task vectors ``τ_t`` (``{name: tensor}``, one
dict per task, same names and shapes) and returns one merged delta ``δ``; the
merged model is ``θ_pre + δ`` (:func:`apply_delta`), evaluated with each task's
own head. Pure tensor functions, tested against plain reference code; the merge is
computed on the first task vector's device (the others are moved a tensor at a time). For tasks
that arrive one at a time, :func:`arrivals` gives the merged delta after each
arrival (OPCM carries its state forward instead of starting over).

>>> import torch
>>> taus = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 2.0])}]
>>> average(taus)["w"].tolist(), task_arithmetic(taus, 0.5)["w"].tolist()
([2.0, 0.0], [2.0, 0.0])
>>> ties(taus, density=0.5)["w"].tolist()  # keep the top half of each, elect signs, disjoint mean
[3.0, -2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from skillbank.devices import OnDevice, device_of
from skillbank.errors import TaskVectorError
from skillbank.sparse import check_sparsity, num_selected
from skillbank.vectors.spectral import is_weight_matrix

__all__ = [
    "arrivals",
    "average",
    "checked",
    "consensus",
    "magmax",
    "opcm",
    "opcm_steps",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "trim_top",
]

TaskVectors = Sequence[Mapping[str, Tensor]]


def checked(taus: TaskVectors) -> tuple[list[str], list[Mapping[str, Tensor]]]:
    """The parameter names the task vectors share, and the task vectors as seen on the first one's device
    (the others are moved one tensor at a time: :mod:`skillbank.devices`)."""
    if not taus:
        raise TaskVectorError("no task vectors to merge.")
    names = list(taus[0])
    for i, tau in enumerate(taus[1:], 1):
        if set(tau) != set(names):
            raise TaskVectorError(f"task vector {i} covers other parameters than task vector 0; merge task vectors of one base.")
        bad = [n for n in names if tau[n].shape != taus[0][n].shape]
        if bad:
            raise TaskVectorError(f"task vector {i} has other shapes for {bad[:3]}; merge task vectors of one base.")
    device = device_of(taus[0].values())
    return names, [OnDevice(tau, device) for tau in taus]


def task_arithmetic(taus: TaskVectors, scale: float = 0.3) -> dict[str, Tensor]:
    """``λ · Σ_t τ_t`` (Ilharco et al., 2023); ``λ`` is usually chosen on validation data."""
    names, taus = checked(taus)
    return {n: scale * torch.stack([t[n].float() for t in taus]).sum(0) for n in names}


def average(taus: TaskVectors) -> dict[str, Tensor]:
    """``(1/T) Σ_t τ_t``: the mean of the finetuned weights (model soup / simple averaging)."""
    return task_arithmetic(taus, 1.0 / max(len(taus), 1))


def _kth_largest(flat_abs: Tensor, k: int) -> Tensor:
    return torch.kthvalue(flat_abs, flat_abs.numel() - k + 1).values


def trim_top(tau: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """``τ`` with all but its top ``ceil(density·P)`` magnitudes (over all parameters together) set to 0.

    Ties at the threshold are all kept, so slightly more than ``k`` entries may survive.
    """
    check_sparsity(density)
    flat = torch.cat([t.reshape(-1).abs().float() for t in tau.values()])
    threshold = _kth_largest(flat, num_selected(density, flat.numel()))
    return {
        n: torch.where(t.abs() >= threshold, t.float(), torch.zeros((), dtype=torch.float32, device=t.device))
        for n, t in tau.items()
    }


def ties(taus: TaskVectors, density: float = 0.2, scale: float = 1.0) -> dict[str, Tensor]:
    """TIES-merging (Yadav et al., 2023): trim each ``τ_t`` to its top ``density``, elect the sign of the
    summed trimmed values per entry, and average only the entries that agree with it (disjoint mean); times ``λ``."""
    names, taus = checked(taus)
    trimmed = [trim_top(t, density) for t in taus]
    merged = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0).clamp_min(1)
        merged[n] = scale * (stack * agree).sum(0) / count
    return merged


def tall_masks(
    taus: TaskVectors, lam: float | Sequence[float] = 0.4, merged: Mapping[str, Tensor] | None = None
) -> list[dict[str, Tensor]]:
    """TALL masks (Wang et al., 2024): ``m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|``, ``τ_MTL = Σ_t τ_t`` unless ``merged`` is given.

    An entry is in task ``t``'s mask when ``τ_t`` is a large enough part of the
    multi-task vector there.
    """
    names, taus = checked(taus)
    lams = [float(lam)] * len(taus) if isinstance(lam, (int, float)) else [float(x) for x in lam]
    if len(lams) != len(taus):
        raise TaskVectorError(f"{len(lams)} lambdas for {len(taus)} task vectors.")
    total = dict(merged) if merged is not None else {n: torch.stack([t[n].float() for t in taus]).sum(0) for n in names}
    return [{n: t[n].float().abs() >= lt * (total[n] - t[n].float()).abs() for n in names} for t, lt in zip(taus, lams)]


def consensus(taus: TaskVectors, k: int = 2, lam: float | Sequence[float] = 0.4, scale: float = 0.3) -> dict[str, Tensor]:
    """Consensus task arithmetic (Wang et al., 2024): ``λ · m_cons ⊙ Σ_t τ_t`` with ``m_cons`` the entries
    in at least ``k`` TALL masks; entries only one task (``k=2``) or no task relies on are dropped."""
    if k < 1:
        raise TaskVectorError(f"k must be at least 1, got {k}.")
    names, taus = checked(taus)
    total = {n: torch.stack([t[n].float() for t in taus]).sum(0) for n in names}
    masks = tall_masks(taus, lam, total)
    return {n: scale * total[n] * (torch.stack([m[n] for m in masks]).sum(0) >= k) for n in names}


def magmax(taus: TaskVectors, scale: float = 1.0) -> dict[str, Tensor]:
    """MagMax (Marczak et al., 2024): per entry, the task-vector value of largest magnitude (ties: the
    earliest task), times ``λ``.

    >>> magmax([{"w": torch.tensor([1.0, -3.0])}, {"w": torch.tensor([-2.0, 2.0])}])["w"].tolist()
    [-2.0, -3.0]
    """
    merged = {}
    names, taus = checked(taus)
    for n in names:
        stack = torch.stack([t[n].float() for t in taus])
        pick = stack.abs().argmax(0, keepdim=True)  # the first maximum on ties
        merged[n] = scale * stack.gather(0, pick).squeeze(0)
    return merged


def _norm(tensors: Mapping[str, Tensor], names: Sequence[str]) -> float:
    """The L2 norm of ``tensors[names]`` taken together (float64, summed on their device)."""
    start = torch.zeros((), dtype=torch.float64, device=device_of(tensors[n] for n in names))
    return float(torch.sqrt(sum(((tensors[n].double() ** 2).sum() for n in names), start)))


def _orthogonal_part(previous: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """``τ`` without its components in the leading singular directions of ``previous`` (OPCM's projection).

    In the bases of ``previous = U Σ Vᵀ`` (full SVD) the coefficients ``Uᵀ τ V`` are
    zeroed on the diagonal and in the leading ``r × r`` block, ``r`` the first rank
    whose cumulative share of singular values exceeds ``alpha``.
    """
    u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
    if not float(s.sum()) > 0:
        return tau.float()
    rank = int((s.cumsum(0) / s.sum() > alpha).double().argmax())
    coefficients = u.T @ tau.double() @ vh.T
    coefficients.diagonal().zero_()
    coefficients[:rank, :rank] = 0
    return (u @ coefficients @ vh).float()


def opcm_steps(
    taus: TaskVectors, alpha: float = 0.5, matrices: Callable[[str, Tensor], bool] | None = None
) -> Iterator[dict[str, Tensor]]:
    """OPCM (Tang et al., 2025), one merged delta after each arrival, in order.

    Each new ``τ_t`` is added to the running sum after removing, in every weight
    matrix, its components along the leading singular directions of the merge so
    far (other tensors are added as they are); the merge is the running sum
    rescaled to the mean norm of the task vectors seen (adaptive scaling, so no
    coefficient is tuned). ``matrices(name, tensor)`` says which tensors are
    projected: by default 2-D ones outside the embeddings (OPCM projects the linear layers).
    """
    if not 0 <= alpha < 1:
        raise TaskVectorError(f"alpha must be in [0, 1), got {alpha}.")
    names, taus = checked(taus)
    project = matrices or is_weight_matrix
    total: dict[str, Tensor] = {}
    norms: list[float] = []
    for tau in taus:
        norms.append(_norm(tau, names))
        for n in names:
            new = tau[n].float()
            if n in total and project(n, new):
                new = _orthogonal_part(total[n], new, alpha)
            total[n] = total[n] + new if n in total else new.clone()
        norm = _norm(total, names)
        scale = (sum(norms) / len(norms)) / norm if norm > 0 else 0.0
        yield {n: t * scale for n, t in total.items()}


def opcm(taus: TaskVectors, alpha: float = 0.5, matrices: Callable[[str, Tensor], bool] | None = None) -> dict[str, Tensor]:
    """OPCM's merged delta after every task of ``taus`` arrived in order (see :func:`opcm_steps`)."""
    merged: dict[str, Tensor] = {}
    for merged in opcm_steps(taus, alpha, matrices):
        pass
    return merged


def arrivals(merge: Callable[[TaskVectors], dict[str, Tensor]], taus: TaskVectors) -> Iterator[dict[str, Tensor]]:
    """A one-shot merger run as tasks arrive: ``merge(taus[:t])`` for ``t = 1 … T`` (running TA, TIES, MagMax).

    >>> [d["w"].tolist() for d in arrivals(lambda ts: task_arithmetic(ts, 1.0), [{"w": torch.ones(1)}] * 2)]
    [[1.0], [2.0]]
    """
    for t in range(1, len(taus) + 1):
        yield merge(taus[:t])

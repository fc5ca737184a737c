"""A learned mask's state sharded with FSDP2: each tensor's ``τ`` and scores live with the block that uses them.

:class:`~skillbank.localization.mask_learner.MaskLearner` keeps one flat ``τ`` and one
flat score vector, which every DDP rank replicates. Under Lightning's
``ModelParallelStrategy`` its ``configure_model`` hands them to :func:`shard_scores`
instead: each scored tensor gets a :class:`ScoredTensor` parametrization holding its
slice of ``τ``, its scores (and, with a pool, the pool's positions in it), so
``fully_shard`` of the tensor's block shards the base, ``τ``, the scores and Adam's
moments together, ``1/world`` of each on every rank. In the block's forward FSDP
gathers them for that block only, and the parametrization gives the weight
``θ_pre + gate ⊙ τ``, exactly as the flat learner computes it.

The binary mask is chosen without gathering the scores: the ``k``-th largest score is
found by a bisection over the float's order (one all-reduce of a count per step), and
ties at it go to the earliest positions in the flat learner's order (tensor by tensor,
then by position), as :func:`~skillbank.sparse.topk_positions` breaks them. The final
mask is gathered tensor by tensor, so no rank ever holds more than one tensor's
chosen entries at a time beyond the skill itself.

The recipe's penalty is summed over the tensors the forward used, so a scored tensor the
model never uses gets none (the flat learner's regularizer reaches every score): leave such
tensors out with ``exclude``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from skillbank.errors import SkillbankError
from skillbank.sharding import reshard
from skillbank.storage.skill import Region

__all__ = ["GateState", "ScoredTensor", "ShardedScores", "kth_largest", "shard_scores"]

#: bisection bounds: the order keys of -inf and +inf (every finite score lies between)
_KEY_LOW, _KEY_HIGH = -0x7F800000, 0x7F800000


@dataclass
class GateState:
    """What every :class:`ScoredTensor` of one learner reads in its forward: soft gates or the binary mask.

    ``penalty`` turns a tensor's soft gate into its share of the recipe's regularizer; each
    forward with gradients appends it to ``penalties``, which the learner sums and clears.
    """

    penalty: Callable[[Tensor], Tensor]
    binary: bool = False
    threshold: float = 0.0
    ties: list[int] = field(default_factory=list)  # per tensor: how many scores equal to the threshold join the mask
    penalties: list[Tensor] = field(default_factory=list)


class ScoredTensor(nn.Module):
    """Parametrization of one scored tensor: ``θ_pre + gate ⊙ τ`` at its scored entries (all, or a pool's).

    ``tau`` and ``scores`` are flat over the scored entries; ``positions`` (a pool only)
    are their ascending flat positions in the tensor. All three are parameters, so the
    block's ``fully_shard`` shards them (the scores alone train).
    """

    def __init__(self, tau: Tensor, scores: Tensor, positions: Tensor | None, state: GateState, index: int) -> None:
        super().__init__()
        self.tau = nn.Parameter(tau, requires_grad=False)
        self.scores = nn.Parameter(scores)
        self.positions = None if positions is None else nn.Parameter(positions, requires_grad=False)
        self.index = index
        self._state = [state]  # in a list: a plain attribute, not a submodule

    def gate(self) -> Tensor:
        """The soft gate ``σ(S)`` (its penalty recorded while training), or the binary mask's 0/1."""
        state = self._state[0]
        if not state.binary:
            gate = torch.sigmoid(self.scores)
            if torch.is_grad_enabled():
                state.penalties.append(state.penalty(gate))
            return gate
        scores = self.scores.detach()
        keep = scores > state.threshold
        keep[torch.nonzero(scores == state.threshold).squeeze(1)[: state.ties[self.index]]] = True
        return keep.to(scores.dtype)

    def forward(self, base: Tensor) -> Tensor:
        delta = self.gate() * self.tau
        if self.positions is None:
            return (base.float() + delta.view(base.shape)).to(base.dtype)
        return base.float().reshape(-1).index_add(0, self.positions, delta).view(base.shape).to(base.dtype)


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a sharded parameter (the tensor itself when it is not a DTensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _float_of_key(key: int) -> float:
    """The float32 whose order key is ``key`` (see :func:`kth_largest`)."""
    bits = key if key >= 0 else -key - 0x80000000
    return float(torch.tensor([bits], dtype=torch.int32, device="cpu").view(torch.float32))


def kth_largest(parts: Sequence[Tensor], k: int, all_reduce: Callable[[Tensor], Tensor]) -> float:
    """The ``k``-th largest value over the finite float ``parts`` of every rank, exactly, without gathering them.

    Bisects over the order keys of float32 (non-negative floats keep their bits, a negative
    one is minus its magnitude's bits): 32 steps, each one count all-reduced. ``all_reduce``
    sums a tensor over the ranks (the identity in one process). ``-0.0`` counts as ``0.0``.

    >>> kth_largest([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 3.0])], 3, lambda t: t)
    1.0
    """
    low, high = _KEY_LOW, _KEY_HIGH  # count(≥ low) ≥ k holds throughout
    while low < high:
        middle = (low + high + 1) // 2
        threshold = _float_of_key(middle)
        local = sum(int((p >= threshold).sum()) for p in parts)
        count = all_reduce(torch.tensor([local], dtype=torch.int64, device="cpu"))
        if int(count) >= k:
            low = middle
        else:
            high = middle - 1
    return _float_of_key(low) + 0.0


class ShardedScores(nn.Module):
    """The sharded learner's scored tensors: the binary mask chosen and gathered across ranks, and the best one kept.

    Built by :func:`shard_scores`; ``best`` (one bool per scored entry, sharded like the
    scores, never gathered) holds the best-validating mask so that a distributed checkpoint
    saves and restores it with the scores.
    """

    def __init__(self, units: Sequence[tuple[str, ScoredTensor]], state: GateState, keep_best: bool) -> None:
        super().__init__()
        self._units = list(units)  # (base name, parametrization) in the flat learner's order; registered in the model
        self.state = state
        self.best = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(u.scores, dtype=torch.bool), requires_grad=False) for _, u in units]
            if keep_best
            else []
        )
        self._offsets: list[int] = [0] * len(units)
        self._group: dist.ProcessGroup | None = None
        self._model: list[nn.Module] = []

    # ---- collectives --------------------------------------------------------------------------

    # small counts are made on the CPU and cross the group where its backend works (NCCL: the scores' GPU)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self._group is None:
            return tensor
        tensor = tensor.to(self._device)
        dist.all_reduce(tensor, group=self._group)
        return tensor.cpu()

    def _all_gather(self, tensor: Tensor) -> Tensor:
        """``[world, *tensor.shape]``: every rank's ``tensor`` (same shape on each), on the CPU."""
        if self._group is None:
            return tensor.unsqueeze(0)
        tensor = tensor.to(self._device)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(parts, tensor, group=self._group)
        return torch.stack(parts).cpu()

    @property
    def _device(self) -> torch.device:
        return self.local_scores(0).device if self._units else torch.device("cpu")

    def _all_gather_objects(self, obj: object) -> list[object]:
        if self._group is None:
            return [obj]
        out: list[object] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def connect(self, group: dist.ProcessGroup | None, model: nn.Module) -> None:
        """After sharding ``model``: learn where this rank's part of each tensor starts (the sum of the earlier ranks'
        parts)."""
        self._group, self._model = group, [model]  # in a list: a plain attribute, not a submodule
        sizes = [self.local_scores(i).numel() for i in range(len(self._units))]
        every = self._all_gather(torch.tensor(sizes, dtype=torch.int64, device="cpu"))
        self._offsets = (every.cumsum(0) - every)[self.rank].tolist()

    @property
    def rank(self) -> int:
        return 0 if self._group is None else dist.get_rank(self._group)

    # ---- this rank's parts --------------------------------------------------------------------

    def _resharded(self) -> None:
        """Back to the shards before the local parts are read (:func:`~skillbank.sharding.reshard`)."""
        if self._model:
            reshard(self._model[0])

    def local_scores(self, i: int) -> Tensor:
        return _local(self._units[i][1].scores).detach().float()

    def scores(self) -> Iterator[nn.Parameter]:
        """The trainable scores (sharded parameters), for the optimizer."""
        for _, unit in self._units:
            yield unit.scores

    @property
    def local_nbytes(self) -> int:
        """Bytes this rank keeps per scored entry: ``τ``, the scores, Adam's two moments, pool positions, best mask."""
        self._resharded()
        total = 0
        for i, (_, unit) in enumerate(self._units):
            scores = _local(unit.scores)
            total += _local(unit.tau).nbytes + 3 * scores.nbytes
            if unit.positions is not None:
                total += _local(unit.positions).nbytes
            if len(self.best):
                total += _local(self.best[i]).nbytes
        return total

    def penalty(self) -> Tensor:
        """The regularizer of the last training forward (every scored tensor's share), then forgotten."""
        penalties, self.state.penalties = self.state.penalties, []
        if not penalties:
            raise SkillbankError("no scored tensor was used in the forward pass: is the model called with its own weights?")
        return torch.stack([p.reshape(()) for p in penalties]).sum()

    # ---- the binary mask ----------------------------------------------------------------------

    def choose(self, k: int | None) -> tuple[list[Tensor], int]:
        """Set the binary mask (top-``k`` of the scores, or ``S > 0`` when ``k`` is None) for the forward; return
        this rank's chosen entries (a bool per local score, each tensor) and the mask's size over all ranks."""
        self._resharded()
        parts = [self.local_scores(i) for i in range(len(self._units))]
        threshold = 0.0 if k is None else kth_largest(parts, k, self._all_reduce)
        counts = [[int((p > threshold).sum()), int((p == threshold).sum())] for p in parts]
        every = self._all_gather(torch.tensor(counts, dtype=torch.int64, device="cpu").reshape(-1, 2))
        greater = int(every[..., 0].sum())
        ties_left = 0 if k is None else k - greater
        tensor_ties = every[..., 1].sum(0).tolist()
        ties, rank_ties = [], []
        for i, total in enumerate(tensor_ties):
            take = max(0, min(total, ties_left))
            ties_left -= take
            ties.append(take)
            before = int(every[: self.rank, i, 1].sum())
            rank_ties.append(max(0, min(int(every[self.rank, i, 1]), take - before)))
        self.state.threshold, self.state.ties = threshold, ties
        chosen = []
        for p, take in zip(parts, rank_ties):
            keep = p > threshold
            keep[torch.nonzero(p == threshold).squeeze(1)[:take]] = True
            chosen.append(keep)
        return chosen, greater + sum(ties)

    @contextmanager
    def binary_gates(self) -> Iterator[None]:
        """Within: the forward uses the binary mask :meth:`choose` set rather than the soft gates."""
        self.state.binary = True
        try:
            yield
        finally:
            self.state.binary = False

    def count_positive(self) -> int:
        """How many scores are above 0 over all ranks."""
        self._resharded()
        local = sum(int((self.local_scores(i) > 0).sum()) for i in range(len(self._units)))
        return int(self._all_reduce(torch.tensor([local], dtype=torch.int64, device="cpu")))

    def remember_best(self, chosen: Sequence[Tensor]) -> None:
        """Keep ``chosen`` (this rank's part of a mask) as the best mask."""
        with torch.no_grad():
            for best, keep in zip(self.best, chosen):
                _local(best).copy_(keep)

    def best_chosen(self) -> list[Tensor]:
        """This rank's part of the best mask kept so far."""
        self._resharded()
        return [_local(best).detach().clone() for best in self.best]

    def regions(self, chosen: Sequence[Tensor]) -> dict[str, Region]:
        """The mask as ``{base name: Region}`` on every rank, gathered one tensor at a time (ascending indices)."""
        self._resharded()
        regions = {}
        for i, ((name, unit), keep) in enumerate(zip(self._units, chosen)):
            picked = torch.nonzero(keep).squeeze(1)
            positions = _local(unit.positions)[picked] if unit.positions is not None else picked + self._offsets[i]
            values = _local(unit.tau).detach()[picked]
            parts = self._all_gather_objects((positions.to("cpu", torch.int64), values.to("cpu", torch.float32)))
            regions[name] = Region(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))  # type: ignore[index]
        return regions


def shard_scores(
    model: nn.Module,
    model_names: Mapping[str, str],
    tensors: Sequence[tuple[str, Tensor, Tensor, Tensor | None]],
    penalty: Callable[[Tensor], Tensor],
    keep_best: bool,
) -> ShardedScores:
    """Give each scored tensor of ``model`` its :class:`ScoredTensor` (not yet sharded: see the learner's
    ``configure_model``).

    Args:
        model: the wrapped model; its parameters hold ``θ_pre``.
        model_names: base name -> the model's parameter name.
        tensors: ``(base name, τ, scores, pool positions or None)`` in the flat learner's order.
        penalty: a tensor's soft gate -> its share of the recipe's regularizer.
        keep_best: whether to keep the best-validating mask (sharded like the scores).
    """
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
    state = GateState(penalty)
    units = []
    for i, (name, tau, scores, positions) in enumerate(tensors):
        full = model_names[name]
        param = model.get_parameter(full)
        if len(owners.get(id(param), [])) > 1:
            raise SkillbankError(
                f"{full!r} is tied to {owners[id(param)][1:]}: the sharded learner cannot score a tied parameter; "
                f"leave it at the base with exclude=[{name!r}]."
            )
        module_name, _, param_name = full.rpartition(".")
        unit = ScoredTensor(tau, scores, positions, state, i)
        parametrize.register_parametrization(model.get_submodule(module_name), param_name, unit, unsafe=True)
        units.append((name, unit))
    return ShardedScores(units, state, keep_best)

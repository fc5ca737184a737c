"""The paper's rule: where skills overlap, their task-vector entries are averaged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from skillbank.stitching.overlap.rule import OverlapRule, register_rule

if TYPE_CHECKING:  # torch is not imported to list the rules (the CLI's --help)
    from torch import Tensor

__all__ = ["MeanRule"]


@register_rule
class MeanRule(OverlapRule):
    """``θ = θ_pre + Σ_i γ_i τ_i / Σ_i γ_i``: overlaps averaged, elsewhere each skill as is (Localize-and-Stitch).

    >>> import torch
    >>> rule, acc = MeanRule(), torch.zeros(2, 1, dtype=torch.float64)
    >>> rule.update(acc, torch.tensor([2.0, 4.0], dtype=torch.float64), 1)
    >>> rule.update(acc[1:], torch.tensor([6.0], dtype=torch.float64), 1)
    >>> rule.delta(acc, torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist()
    [2.0, 5.0]
    """

    name = "mean"
    columns = 1
    summary = "overlapping entries are averaged (the paper's rule; order-free)"

    def update(self, acc: Tensor, values: Tensor, sign: int) -> None:
        acc[:, 0] += sign * values

    def delta(self, acc: Tensor, count: Tensor) -> Tensor:
        return acc[:, 0] / count

    def relaxed(self, acc: Tensor, count: Tensor, gate: Tensor, tau: Tensor) -> Tensor:
        # Uncovered (count 0): gate·τ / max(gate, 1) = gate·τ; covered: the exact mean at gate ∈ {0, 1}.
        return (acc[:, 0] + gate * tau) / (count + gate).clamp(min=1)

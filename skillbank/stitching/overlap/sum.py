"""Sum within masks: overlapping entries add up, as task arithmetic at scale 1 restricted to the masks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from skillbank.stitching.overlap.rule import OverlapRule, register_rule

if TYPE_CHECKING:  # torch is not imported to list the rules (the CLI's --help)
    from torch import Tensor

__all__ = ["SumRule"]


@register_rule
class SumRule(OverlapRule):
    """``θ = θ_pre + Σ_i γ_i τ_i``: no averaging; each skill keeps its full value, overlaps add up.

    >>> import torch
    >>> rule, acc = SumRule(), torch.zeros(1, 1, dtype=torch.float64)
    >>> rule.update(acc, torch.tensor([4.0], dtype=torch.float64), 1); rule.update(acc, torch.tensor([6.0], dtype=torch.float64), 1)
    >>> rule.delta(acc, torch.tensor([2.0], dtype=torch.float64)).tolist()
    [10.0]
    """

    name = "sum"
    columns = 1
    summary = "overlapping entries add up (task arithmetic within the masks; order-free)"

    def update(self, acc: Tensor, values: Tensor, sign: int) -> None:
        acc[:, 0] += sign * values

    def delta(self, acc: Tensor, count: Tensor) -> Tensor:
        return acc[:, 0].clone()

    def relaxed(self, acc: Tensor, count: Tensor, gate: Tensor, tau: Tensor) -> Tensor:
        return acc[:, 0] + gate * tau

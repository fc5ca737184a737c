"""Sign-elected mean, as TIES-merging: where skills overlap, the sign of the summed values wins and the
entries that agree with it are averaged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from skillbank.stitching.overlap.rule import OverlapRule, register_rule

if TYPE_CHECKING:  # torch is not imported to list the rules (the CLI's --help)
    from torch import Tensor

__all__ = ["SignMeanRule"]


@register_rule
class SignMeanRule(OverlapRule):
    """Per entry: elect ``sign(Σ_i γ_i τ_i)``, average the ``τ_i`` of that sign (TIES' disjoint mean).

    An entry one skill covers gets that skill's value; with every skill's mask
    its top-``d`` of ``|τ|``, this is TIES-merging at density ``d`` and scale 1.
    Exact for any order of adds and removes: it keeps the sum and count of the
    positive and of the negative values (zeros join neither, as in TIES).

    >>> import torch
    >>> rule, acc = SignMeanRule(), torch.zeros(1, 4, dtype=torch.float64)
    >>> for v in (3.0, 1.0, -2.0):
    ...     rule.update(acc, torch.tensor([v], dtype=torch.float64), 1)
    >>> rule.delta(acc, torch.tensor([3.0], dtype=torch.float64)).tolist()  # + wins (sum 2): mean of 3 and 1
    [2.0]
    """

    name = "sign_mean"
    columns = 4  # positive sum, positive count, negative sum, negative count
    summary = "the sign of the summed entries is elected; entries of that sign are averaged (TIES-style; order-free)"

    def update(self, acc: Tensor, values: Tensor, sign: int) -> None:
        positive, negative = (values > 0).double(), (values < 0).double()
        acc[:, 0] += sign * values * positive
        acc[:, 1] += sign * positive
        acc[:, 2] += sign * values * negative
        acc[:, 3] += sign * negative
        if sign < 0:  # a side nobody is left on sums to exactly 0, so it cannot sway a later election
            acc[:, 0] = acc[:, 0].where(acc[:, 1] != 0, 0.0)
            acc[:, 2] = acc[:, 2].where(acc[:, 3] != 0, 0.0)

    def delta(self, acc: Tensor, count: Tensor) -> Tensor:
        total = acc[:, 0] + acc[:, 2]
        up = acc[:, 0] / acc[:, 1].clamp(min=1)
        down = acc[:, 2] / acc[:, 3].clamp(min=1)
        return up.where(total > 0, down.where(total < 0, 0.0))

"""The overlap-rule interface and its registry (one rule a module, chosen by name, as mergekit's merge methods)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from skillbank.errors import StitchError
from skillbank.registry import Registry

if TYPE_CHECKING:  # torch is not imported to list the rules (the CLI's --help)
    from torch import Tensor

__all__ = ["OverlapRule", "RULES", "get_rule", "register_rule"]

#: Every known rule, by name.
RULES: Registry[type[OverlapRule]] = Registry("overlap rule", StitchError)


class OverlapRule(ABC):
    """How the entries of several skills that cover the same parameter entry are combined.

    A rule keeps ``columns`` float64 accumulators per covered entry. ``update``
    adds one skill's values into them (``sign=1``) or takes them out again
    (``sign=-1``); ``delta`` turns them into the merged offset from the base.
    Both act on the rows of the covered entries only, so a stitch stays
    O(skill size), and a rule whose accumulators are sums is exact for any order
    of adds and removes (up to float64 rounding). When an entry's cover count
    drops to 0 the Stitcher resets its accumulators to exactly 0 and writes the
    base back bit for bit, whatever the rule.
    """

    #: The name the Stitcher, the callbacks and the CLI know the rule by.
    name: ClassVar[str]
    #: Accumulators per covered entry (float64).
    columns: ClassVar[int]
    #: Whether the result is the same for every order of adds and removes.
    order_free: ClassVar[bool] = True
    #: One line for ``--help`` and the stitched model's card.
    summary: ClassVar[str]

    @abstractmethod
    def update(self, acc: Tensor, values: Tensor, sign: int) -> None:
        """Fold one skill's ``values`` (float64, one per row) into ``acc`` (``[rows, columns]``) in place."""

    @abstractmethod
    def delta(self, acc: Tensor, count: Tensor) -> Tensor:
        """The merged offset from the base for each row; ``count`` (float64, ≥ 1) is how many skills cover it."""

    def relaxed(self, acc: Tensor, count: Tensor, gate: Tensor, tau: Tensor) -> Tensor:
        """The offset after adding a new skill with a soft mask ``gate`` in [0, 1] (differentiable in ``gate``).

        Equals :meth:`delta` after :meth:`update` wherever ``gate`` is 0 or 1, so a
        mask can be learned against the model it will join. ``acc``/``count``
        describe the skills already stitched (``count`` may be 0).
        """
        raise StitchError(
            f"the overlap rule {self.name!r} has no differentiable form; learn masks in context "
            f"with one of {[n for n, r in RULES.items() if r.relaxed is not OverlapRule.relaxed]}."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_rule(cls: type[OverlapRule]) -> type[OverlapRule]:
    """Class decorator: make ``cls`` available by its ``name``."""
    return RULES.add(cls.name, cls)


def get_rule(rule: str | OverlapRule) -> OverlapRule:
    """The rule named ``rule`` (or ``rule`` itself).

    Raises:
        StitchError: no rule has that name.
    """
    if isinstance(rule, OverlapRule):
        return rule
    return RULES[rule]()

"""Overlap rules: how the :class:`~skillbank.Stitcher` combines skills that cover the same entry.

Each rule lives in its own module behind one small interface
(:class:`OverlapRule`) and is chosen by name — ``Stitcher(model, rule="sign_mean")``,
``skillbank stitch --rule sign_mean``. ``"mean"`` (the paper's) is the default.
"""

from skillbank.stitching.overlap.mean import MeanRule
from skillbank.stitching.overlap.rule import RULES, OverlapRule, get_rule, register_rule
from skillbank.stitching.overlap.sign_mean import SignMeanRule
from skillbank.stitching.overlap.sum import SumRule

__all__ = ["MeanRule", "OverlapRule", "RULES", "SignMeanRule", "SumRule", "get_rule", "register_rule"]

"""Localization methods: how a skill's mask is found from a task vector.

Each method lives in its own module behind one small interface (:class:`LocalizationMethod`) and is chosen by
name, as the overlap rules are: ``skillbank localize --method learned``, ``SkillHarvester(method="learned")``,
``LocalizationSpec(method=...)``. ``"dataless"`` is the default. Adding a method is one module and one
:func:`register_method`. Sizes chosen on validation (``sparsity="auto"``) wrap any method
(:func:`~skillbank.localization.finetune.localize_finetune`).
"""

from skillbank.localization.methods.dataless import DatalessMethod
from skillbank.localization.methods.learned import LearnedMethod
from skillbank.localization.methods.method import METHODS, LocalizationInputs, LocalizationMethod, get_method, register_method

register_method(DatalessMethod())
register_method(LearnedMethod())

__all__ = [
    "METHODS",
    "DatalessMethod",
    "LearnedMethod",
    "LocalizationInputs",
    "LocalizationMethod",
    "get_method",
    "register_method",
]

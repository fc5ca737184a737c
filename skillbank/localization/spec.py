"""``LocalizationSpec``: how a finetune becomes a skill, as one frozen, typed value that round-trips through JSON and
the skill's metadata (``settings["spec"]``), so a skill says exactly how it was made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.localization.auto_sparsity import DEFAULT_GRID
from skillbank.localization.methods import get_method
from skillbank.sparse import check_sparsity
from skillbank.storage.format import VALUE_DTYPE_NAMES

__all__ = ["LocalizationSpec"]


@dataclass(frozen=True)
class LocalizationSpec:
    """What to localize and how; checked when made.

    Attributes:
        method: a name from :data:`skillbank.localization.methods.METHODS` (``"dataless"``, ``"learned"``).
        sparsity: the fraction of shared entries in the mask, or ``"auto"``: the smallest size of ``grid``
            whose skill alone keeps ``target_recovery`` of the finetune's validation score.
        target_recovery, grid: the goal and the sizes of the ``auto`` search.
        exclude: regexes of parameters never selected.
        head_patterns: regexes of shared parameters treated as the task head.
        value_dtype: the dtype the skill stores its values in.
        learner: :class:`~skillbank.MaskLearner` options for ``"learned"`` (``recipe``, ``lr``, ``pool``, …).

    >>> spec = LocalizationSpec(method="learned", sparsity="auto", learner={"recipe": "topk"})
    >>> LocalizationSpec.from_dict(spec.to_dict()) == spec
    True
    """

    method: str = "dataless"
    sparsity: float | str = 0.01
    target_recovery: float = 0.99
    grid: tuple[float, ...] = DEFAULT_GRID
    exclude: tuple[str, ...] = ()
    head_patterns: tuple[str, ...] = ()
    value_dtype: str = "float32"
    learner: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_method(self.method)  # an unknown name lists the known ones
        if isinstance(self.sparsity, str):
            if self.sparsity != "auto":
                raise SkillbankError(f"sparsity must be a fraction in (0, 1] or 'auto', got {self.sparsity!r}.")
        else:
            check_sparsity(self.sparsity)
        if not 0 < self.target_recovery <= 1.5:
            raise SkillbankError(f"target_recovery must be in (0, 1.5], got {self.target_recovery}.")
        if self.value_dtype not in VALUE_DTYPE_NAMES:
            raise SkillbankError(f"value_dtype must be one of {', '.join(VALUE_DTYPE_NAMES)}, got {self.value_dtype!r}.")
        for name in ("grid", "exclude", "head_patterns"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise SkillbankError(f"{name} must be a list, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        for sparsity in self.grid:
            check_sparsity(sparsity)
        object.__setattr__(self, "learner", dict(self.learner))

    @property
    def auto(self) -> bool:
        """Whether the size is chosen on validation data."""
        return self.sparsity == "auto"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples)."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalizationSpec:
        """Read :meth:`to_dict` output (unknown keys, from a newer release, are ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

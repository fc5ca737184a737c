"""``LocalizationSpec``: how a finetune becomes a skill, as one frozen, typed value that round-trips through JSON and
the skill's metadata (``settings["spec"]``), so a skill says exactly how it was made. ``LearnerSpec``: its part that
says how a learned mask trains (what :class:`~skillbank.MaskLearner` takes)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.localization.auto_sparsity import DEFAULT_GRID
from skillbank.localization.context_loss import CONTEXT_LOSSES
from skillbank.localization.mask_recipes import MaskRecipe, resolve_recipe
from skillbank.localization.methods import get_method
from skillbank.sparse import check_sparsity
from skillbank.storage.format import VALUE_FORMATS

__all__ = ["LearnerSpec", "LocalizationSpec"]


@dataclass(frozen=True)
class LearnerSpec:
    """How a learned mask trains; checked when made.

    Attributes:
        recipe: ``"topk"`` (default) or ``"paper"`` (:data:`~skillbank.localization.mask_recipes.RECIPES`), or a
            recipe's fields.
        lr, l1, init_scale, init_sparsity, binarize, full_batch: override the recipe's value when given.
        keep_best: keep the binary mask that scored best in validation (ties go to the later epoch), as
            ``ModelCheckpoint(monitor="val_acc")`` would; without validation, the last mask.
        rule: with earlier skills as context, the overlap rule of the Stitcher the skill will join (``"mean"`` or
            ``"sum"``: rules with a differentiable form).
        owned_penalty: with context, an extra ``owned_penalty · mean(σ(S))`` over the entries earlier skills own,
            so the mask pays for diluting them.
        context_weight: with context skills that keep examples, the weight of their loss on those examples in the
            objective (:mod:`skillbank.localization.context_loss`), so the mask pays for what it costs them;
            0 (default): the new task's loss alone.
        context_loss: that loss: ``"distill"`` (default; from the model before this skill) or ``"labels"``.
        pool: score only a candidate pool, the top ``pool · k`` entries of ``|τ|`` (30 kept full scoring's quality
            on the real benchmark, 10 did not): ``τ``, the scores and the optimizer's state follow the pool, not the
            model. ``None`` (default): every entry.
        pool_small: with ``pool``, tensors of at most this many entries (biases, LayerNorms) join the pool whole.

    >>> LearnerSpec(recipe="paper", lr=1e6).mask_recipe().lr
    1000000.0
    """

    recipe: str | Mapping[str, Any] = "topk"
    lr: float | None = None
    l1: float | None = None
    init_scale: float | None = None
    init_sparsity: float | None = None
    binarize: str | None = None
    full_batch: bool | None = None
    keep_best: bool = True
    rule: str = "mean"
    owned_penalty: float = 0.0
    context_weight: float = 0.0
    context_loss: str = "distill"
    pool: float | None = None
    pool_small: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.recipe, MaskRecipe):
            object.__setattr__(self, "recipe", self.recipe.to_dict())
        elif isinstance(self.recipe, Mapping):
            object.__setattr__(self, "recipe", dict(self.recipe))
        self.mask_recipe()  # an unknown recipe or a bad override fails now
        if not self.owned_penalty >= 0:
            raise SkillbankError(f"owned_penalty must be >= 0, got {self.owned_penalty}.")
        if not (self.context_weight >= 0 and math.isfinite(self.context_weight)):
            raise SkillbankError(f"context_weight must be a number >= 0, got {self.context_weight}.")
        if self.context_loss not in CONTEXT_LOSSES:
            raise SkillbankError(f"context_loss must be one of {', '.join(CONTEXT_LOSSES)}, got {self.context_loss!r}.")
        if self.pool is not None and not self.pool >= 1:
            raise SkillbankError(f"pool must be >= 1 (the pool holds pool·k entries), got {self.pool}.")
        if int(self.pool_small) != self.pool_small or self.pool_small < 0:
            raise SkillbankError(f"pool_small must be a whole number >= 0, got {self.pool_small!r}.")

    def mask_recipe(self) -> MaskRecipe:
        """The recipe with the overrides applied."""
        overrides = {k: getattr(self, k) for k in ("lr", "l1", "init_scale", "init_sparsity", "binarize", "full_batch")}
        return resolve_recipe(self.recipe, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        return asdict(self)

    @classmethod
    def of(cls, value: LearnerSpec | Mapping[str, Any] | None) -> LearnerSpec:
        """``value`` as a spec: itself, the default for ``None``, or read from :meth:`to_dict` output (unknown keys,
        from a newer release, are ignored)."""
        if isinstance(value, LearnerSpec):
            return value
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (value or {}).items() if k in known})


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
        value_dtype: how the skill stores its values: a float dtype, or ``1bit``/``2bit``/``4bit`` codes
            (:mod:`skillbank.storage.value_codes`).
        learner: how a ``"learned"`` mask trains (a :class:`LearnerSpec`, or its fields).
        routing_centroids: with routing data, at most this many centroids of the base's features (one per label)
            are stored with the skill, so a :class:`~skillbank.stitching.routing.SkillRouter` can pick it.
        low_rank: with ``method="dataless"``, each weight matrix's top ``low_rank`` singular directions of τ kept as a
            low-rank part, the mask taken from what they leave (:mod:`skillbank.localization.low_rank`); 0: none.

    >>> spec = LocalizationSpec(method="learned", sparsity="auto", learner={"pool": 30})
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
    learner: LearnerSpec = field(default_factory=LearnerSpec)
    routing_centroids: int = 16
    low_rank: int = 0

    def __post_init__(self) -> None:
        get_method(self.method)  # an unknown name lists the known ones
        if isinstance(self.sparsity, str):
            if self.sparsity != "auto":
                raise SkillbankError(f"sparsity must be a fraction in (0, 1] or 'auto', got {self.sparsity!r}.")
        else:
            check_sparsity(self.sparsity)
        if not 0 < self.target_recovery <= 1.5:
            raise SkillbankError(f"target_recovery must be in (0, 1.5], got {self.target_recovery}.")
        if self.value_dtype not in VALUE_FORMATS:
            raise SkillbankError(f"value_dtype must be one of {', '.join(VALUE_FORMATS)}, got {self.value_dtype!r}.")
        for name in ("grid", "exclude", "head_patterns"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise SkillbankError(f"{name} must be a list, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        for sparsity in self.grid:
            check_sparsity(sparsity)
        object.__setattr__(self, "learner", LearnerSpec.of(self.learner))
        if isinstance(self.routing_centroids, bool) or not isinstance(self.routing_centroids, int) or self.routing_centroids < 1:
            raise SkillbankError(f"routing_centroids must be a whole number >= 1, got {self.routing_centroids!r}.")
        if isinstance(self.low_rank, bool) or not isinstance(self.low_rank, int) or self.low_rank < 0:
            raise SkillbankError(f"low_rank must be a whole number >= 0 (0: no low-rank part), got {self.low_rank!r}.")
        if self.low_rank and self.method != "dataless":
            raise SkillbankError(
                f"a low-rank part (low_rank={self.low_rank}) is made by the dataless method, not {self.method!r}."
            )

    @property
    def auto(self) -> bool:
        """Whether the size is chosen on validation data."""
        return self.sparsity == "auto"

    def at(self, sparsity: float) -> LocalizationSpec:
        """This spec at one fixed size (what each step of an ``auto`` search learns)."""
        return replace(self, sparsity=sparsity)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples)."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalizationSpec:
        """Read :meth:`to_dict` output (unknown keys, from a newer release, are ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

"""How a :class:`~skillbank.localization.mask_learner.MaskLearner` trains its scores: the default recipe and the paper's.

A recipe is a small frozen dataclass that round-trips through JSON, so the
exact settings of every learned skill are recorded in its metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.sparse import check_sparsity

__all__ = ["RECIPES", "MaskRecipe", "resolve_recipe"]


@dataclass(frozen=True)
class MaskRecipe:
    """Settings of mask learning.

    Attributes:
        init_sparsity: fraction of entries whose score starts high (the top of
            ``|τ|``); ``None`` means the target sparsity.
        init_scale: scores start at ``+init_scale`` on that top-k, ``-init_scale`` elsewhere.
        optimizer: ``"adam"`` or ``"sgd"`` (plain, no momentum), over the scores only.
        lr: learning rate of that optimizer.
        l1: regularisation strength ``λ``.
        regularizer: ``"mean_sigmoid"`` adds ``λ·mean(σ(S))`` to the loss (the
            ``λ·‖σ(S)‖₁ / P`` term of the learned localization: shrinks the soft mask); ``"paper_sign"`` reproduces the released code's
            update ``S += λ·sign(S)·σ'(S)``, which pushes scores away from 0.
        binarize: ``"topk"`` keeps the top-k scores at the target sparsity (mask
            size is exact); ``"round"`` keeps ``round(σ(S))``, i.e. ``S > 0`` (size not controlled).
        full_batch: one update per epoch, the gradient accumulated over the whole
            few-shot loader (the paper); otherwise one update per batch.
        epochs: the recommended ``max_epochs``.
    """

    init_sparsity: float | None
    init_scale: float
    optimizer: str
    lr: float
    l1: float
    regularizer: str
    binarize: str
    full_batch: bool
    epochs: int

    def __post_init__(self) -> None:
        if self.init_sparsity is not None:
            check_sparsity(self.init_sparsity)
        choices = {"optimizer": ("adam", "sgd"), "regularizer": ("mean_sigmoid", "paper_sign"), "binarize": ("topk", "round")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise SkillbankError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}.")
        if not self.lr > 0 or self.l1 < 0 or not self.init_scale > 0:
            raise SkillbankError(
                f"need lr > 0, l1 >= 0 and init_scale > 0; got lr={self.lr}, l1={self.l1}, init_scale={self.init_scale}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


#: ``"topk"`` (default): start from the dataless mask at the target sparsity with
#: scores ±1 (σ = 0.73 / 0.27: a soft start that gradients can reorder within a few
#: dozen Adam steps; at ±3 or ±5 the top-k never changes in 40 steps), Adam at 0.1
#: over the scores, one update per batch, the ``λ·‖σ(S)‖₁ / P`` term with λ = 10 (pushes
#: unused scores down so the soft model cannot lean on a thin spread of τ), 40
#: epochs, and the exact target size at the end. Chosen on the demo's Adam finetunes
#: (benchmarks/RESULTS.md has the sweep).
#: ``"paper"``: the released code's settings for language tasks (Localizer.train_graft):
#: tiny start (1e-5), ±5, full-batch plain gradient steps at lr 1e7 for 10 epochs,
#: the sign regulariser with λ = 10, mask = round(σ(S)).
RECIPES: dict[str, MaskRecipe] = {
    "topk": MaskRecipe(None, 1.0, "adam", 0.1, 10.0, "mean_sigmoid", "topk", False, 40),
    "paper": MaskRecipe(1e-5, 5.0, "sgd", 1e7, 10.0, "paper_sign", "round", True, 10),
}


def resolve_recipe(recipe: str | MaskRecipe | Mapping[str, Any], **overrides: Any) -> MaskRecipe:
    """A named recipe (or a given one, or its ``to_dict()``, as checkpoints keep it) with the non-``None``
    ``overrides`` applied.

    >>> resolve_recipe("paper", lr=1e6).lr
    1000000.0
    """
    if isinstance(recipe, Mapping):
        recipe = MaskRecipe(**recipe)
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise SkillbankError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}.")
        recipe = RECIPES[recipe]
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})

"""What SkillStitcher and SkillSwitcher share: a bank looked at on rank 0 at set moments of a run, the new
skill names broadcast to every rank, a :class:`~skillbank.Stitcher` on the run's model, and the skills' heads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from skillbank.callbacks._model import wrapped_model
from skillbank.errors import SkillbankError
from skillbank.stitching.overlap import get_rule
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.vectors.spectral import MATRIX_MERGES
from skillbank.vectors.weights import WeightsSource

__all__ = ["BankWatcher"]

Watcher = TypeVar("Watcher", bound="BankWatcher")


class BankWatcher(Callback):
    """A callback that looks at a bank at the start of each stage, every ``n`` training steps or predict batches,
    and (``on_validation_start``) at each validation run; subclasses say what a new skill means (:meth:`update`).

    Args: as :class:`~skillbank.callbacks.SkillStitcher`'s (``bank``, ``base``, ``every_n_steps``,
    ``on_validation_start``, ``skills``, ``model_attr``, ``rule``, ``scale``), checked here.
    """

    def __init__(
        self,
        bank: str | Path,
        base: WeightsSource | None = None,
        every_n_steps: int | None = None,
        on_validation_start: bool = True,
        skills: Sequence[str] | None = None,
        model_attr: str | None = "model",
        rule: str = "mean",
        scale: float = 1.0,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise SkillbankError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}.")
        if Path(bank).exists() and not Path(bank).is_dir():
            raise SkillbankError(f"bank path {bank} is a file, not a directory.")
        self.bank, self.base, self.every_n_steps = Path(bank), base, every_n_steps
        self.look_on_validation_start = on_validation_start
        self.skills = None if skills is None else list(skills)
        self.model_attr = model_attr
        self.rule = rule if rule in MATRIX_MERGES else get_rule(rule).name  # fail fast on an unknown name
        if rule not in MATRIX_MERGES and scale != 1.0:
            raise SkillbankError(
                f"scale applies to a matrix composition ({', '.join(sorted(MATRIX_MERGES))}), not rule {rule!r}."
            )
        if not math.isfinite(scale) or scale <= 0:
            raise SkillbankError(f"scale must be a positive number, got {scale}.")
        self.scale = float(scale)
        self._stitcher: Stitcher | SpectralStitcher | None = None
        self._warned: set[str] = set()
        self._latest_step = 0  # the global step of the last look after training batches

    # -- public ------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bank=str(self.bank))

    @classmethod
    def find(cls: type[Watcher], trainer: pl.Trainer) -> Watcher:
        """The trainer's one callback of this class: how a LightningModule reaches the skills' heads
        (``SkillStitcher.find(self.trainer).use_head(name)``) without the callback writing onto it."""
        found = [c for c in trainer.callbacks if isinstance(c, cls)]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise SkillbankError(
                f"the trainer has {len(found)} {cls.__name__} callbacks; {cls.__name__}.find needs exactly one "
                f"(pass Trainer(callbacks=[{cls.__name__}(...)]), or keep a reference to the one you want)."
            )
        return found[0]

    @property
    def heads(self) -> dict[str, dict[str, Tensor]]:
        """The head tensors of each skill the stitcher has read."""
        return self._stitcher.heads if self._stitcher is not None else {}

    def use_head(self, name: str) -> AbstractContextManager[nn.Module]:
        """Context manager: the model with skill ``name``'s head swapped in."""
        if self._stitcher is None:
            raise SkillbankError("no skill is stitched yet.")
        return self._stitcher.use_head(name)

    def should_update(self, step_idx: int, epoch_idx: int) -> bool:
        """Whether to look at the bank after optimizer step ``step_idx`` (zero-based, as in Lightning's
        ``WeightAveraging``; in predict, the batch index); override for other schedules. Asked at most once
        per optimizer step, whatever ``accumulate_grad_batches`` is."""
        return self.every_n_steps is not None and (step_idx + 1) % self.every_n_steps == 0

    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at: str | None = None) -> list[str]:
        """Take in the bank's skills not seen yet; returns their names (the same on every rank). ``at`` says when, as
        the stage counts (for logs: ``"after predict batch 9"``; default the optimizer step)."""
        raise NotImplementedError

    # -- the bank ----------------------------------------------------------------

    def new_names(self, trainer: pl.Trainer, pl_module: pl.LightningModule, known: Sequence[str]) -> list[str]:
        """The bank's skills (of ``skills``) not in ``known``, in bank order: read on rank 0, broadcast to all."""
        stitcher = self._ensure_stitcher(pl_module)
        new: list[str] = []
        error: str | None = None
        if trainer.is_global_zero:
            try:
                wanted = self._bank_names()
                new = [n for n in wanted if n not in known and (self.skills is None or n in self.skills)]
            except SkillbankError as exc:
                error = f"{type(exc).__name__}: {exc}"
        new, error = trainer.strategy.broadcast((new, error), src=0)
        if error is not None:
            raise SkillbankError(f"{type(self).__name__} could not read {self.bank}: {error}")
        if new and stitcher.bank is None:  # the bank exists now (it is never created here)
            stitcher.bank = SkillBank(self.bank, create=False)
        return new

    def _bank_names(self) -> list[str]:
        """The bank's skill names (none while it does not exist: it is never created here), warning once
        about a missing bank and about requested skills it does not hold."""
        who = type(self).__name__
        bank = SkillBank.if_exists(self.bank)
        if bank is None:
            self._warn_once(
                "no bank",
                f"{who}: there is no bank at {self.bank} (yet), so nothing is stitched. It "
                "is looked at again at each look; check the path unless another run is about to fill it.",
            )
            return []
        names = bank.names()
        missing = [n for n in self.skills or [] if n not in names]
        if missing:
            self._warn_once(
                f"missing {missing}",
                f"{who}: {missing} are not in {self.bank} (yet; it holds "
                f"{names or 'no skills'}), so they are not stitched; they will be when they arrive. Check the "
                "names unless they are coming.",
            )
        return names

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _ensure_stitcher(self, pl_module: pl.LightningModule) -> Stitcher | SpectralStitcher:
        """The stitcher on the run's model, made at the first look (a :class:`SpectralStitcher` for a matrix
        composition)."""
        if self._stitcher is None:
            model = wrapped_model(pl_module, self.model_attr)
            bank = SkillBank.if_exists(self.bank)
            if self.rule in MATRIX_MERGES:
                self._stitcher = SpectralStitcher(model, self.base, bank=bank, merge=self.rule, scale=self.scale)
            else:
                self._stitcher = Stitcher(model, self.base, bank=bank, rule=self.rule)
        return self._stitcher

    # -- moments -------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._latest_step = trainer.global_step  # a resumed run counts from where it stopped
        self.update(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._latest_step:  # an optimizer step was taken (not every batch is one)
            self._latest_step = trainer.global_step
            if self.should_update(trainer.global_step - 1, trainer.current_epoch):
                self.update(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.look_on_validation_start:
            self.update(trainer, pl_module, f"at validation start (step {trainer.global_step})")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.update(trainer, pl_module, "at test start")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.update(trainer, pl_module, "at predict start")

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.should_update(batch_idx, trainer.current_epoch):
            self.update(trainer, pl_module, f"after predict batch {batch_idx}")

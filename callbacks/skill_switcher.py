"""SkillSwitcher: answer every batch of a validate, test or predict run with the one skill it names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from skillbank.callbacks._bank_watch import BankWatcher
from skillbank.errors import SkillbankError
from skillbank.stitching.stitcher import Stitcher
from skillbank.vectors.spectral import MATRIX_MERGES
from skillbank.vectors.weights import WeightsSource

__all__ = ["SkillSwitcher"]


class SkillSwitcher(BankWatcher):
    """Serves per task from one base in memory: before each batch the model is switched to the batch's skill
    (:meth:`~skillbank.Stitcher.switch` rewrites only the masks that leave and arrive) and that skill's head is
    swapped in; when the stage ends the model holds the base again, bit for bit.

    Args:
        bank: the bank directory the skills come from (another process may be adding to it).
        switch_by: the batch key that names the skill answering it (a name, or a list of one repeated
            name; :func:`~skillbank.stitching.switching.group_by_skill` groups mixed data into such batches).
        dataloader_skills: instead of ``switch_by``: batches of dataloader ``i`` are answered by skill
            ``dataloader_skills[i]`` (Lightning's multiple dataloaders, one per skill).
        base, every_n_steps, on_validation_start, skills, model_attr, rule: as for
            :class:`~skillbank.callbacks.SkillStitcher`.

    The bank is looked at at the same moments as :class:`~skillbank.callbacks.SkillStitcher`
    looks, so skills banked meanwhile become servable at the next look (:attr:`servable`); a
    batch naming a skill not seen at the last look is an error that lists the servable ones.
    Under DDP rank 0 reads the manifest and broadcasts it.
    """

    _stitcher: Stitcher | None  # declared here too: mypy sees the base class from another package path as Any

    def __init__(
        self,
        bank: str | Path,
        switch_by: str | None = None,
        dataloader_skills: Sequence[str] | None = None,
        base: WeightsSource | None = None,
        every_n_steps: int | None = None,
        on_validation_start: bool = True,
        skills: Sequence[str] | None = None,
        model_attr: str | None = "model",
        rule: str = "mean",
    ) -> None:
        if (switch_by is None) == (dataloader_skills is None):
            raise SkillbankError(
                "give switch_by= (the batch key that names a batch's skill) or dataloader_skills= (one skill per "
                "dataloader), one of the two."
            )
        if rule in MATRIX_MERGES:
            raise SkillbankError(
                f"rule {rule!r} composes several skills' matrices; SkillSwitcher holds one skill at a time: use an "
                "overlap rule (mean), or SkillStitcher for a composed model."
            )
        super().__init__(bank, base, every_n_steps, on_validation_start, skills, model_attr, rule)
        self.switch_by = switch_by
        self.dataloader_skills = None if dataloader_skills is None else list(dataloader_skills)
        self.servable: list[str] = []  # the skills found at the last look
        self._head: AbstractContextManager[nn.Module] | None = None

    @override
    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at: str | None = None) -> list[str]:
        """Note the bank's new skills as servable; returns their names (the same on every rank)."""
        new = self.new_names(trainer, pl_module, self.servable)
        self.servable += new
        return new

    def skill_of(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> str:
        """The skill that answers ``batch``."""
        if self.dataloader_skills is not None:
            if dataloader_idx >= len(self.dataloader_skills):
                raise SkillbankError(
                    f"dataloader {dataloader_idx} has no skill: dataloader_skills lists "
                    f"{len(self.dataloader_skills)} ({self.dataloader_skills})."
                )
            return self.dataloader_skills[dataloader_idx]
        value = batch.get(self.switch_by) if isinstance(batch, Mapping) else None
        if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
            value = value[0]
        if not isinstance(value, str):
            names = sorted({str(v) for v in value}) if isinstance(value, (list, tuple)) else None
            raise SkillbankError(
                f"batch {batch_idx} "
                + (
                    f"mixes the skills {names}: give each batch one skill "
                    "(DataLoader(batch_sampler=skillbank.stitching.switching.group_by_skill(...)))."
                    if names
                    else f"names no skill under {self.switch_by!r}; put the skill's name there."
                )
            )
        return value

    # -- per batch -------------------------------------------------------------

    def _serve(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        name = self.skill_of(batch, batch_idx, dataloader_idx)
        if name not in self.servable:
            raise SkillbankError(
                f"batch {batch_idx} asks for skill {name!r}, which {self.bank} did not hold at the "
                f"last look (servable: {self.servable or 'none'})."
            )
        stitcher = self._ensure_stitcher(pl_module)
        stitcher.switch([name])
        self._head = stitcher.use_head(name)
        self._head.__enter__()

    def _release(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            head.__exit__(None, None, None)

    def _back_to_base(self) -> None:
        self._release()
        if self._stitcher is not None:
            self._stitcher.switch([])

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._serve(pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._release()

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._serve(pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._release()

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._serve(pl_module, batch, batch_idx, dataloader_idx)

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
        self._release()
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

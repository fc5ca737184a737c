"""SkillStitcher: stitch every new skill of a bank into a running model, as the skills arrive."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from skillbank.callbacks._model import wrapped_model
from skillbank.errors import SkillbankError
from skillbank.stitching.overlap import get_rule
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.vectors.weights import WeightsSource

__all__ = ["SkillStitcher"]


class SkillStitcher(Callback):
    """Looks at a bank at set moments of a fit, validate, test or predict run and stitches what is new.

    Each skill is stitched once, in bank order, with :class:`~skillbank.Stitcher`:
    entries outside its mask stay bitwise unchanged, earlier skills are never
    re-applied or re-localized. The stitched parameters must not be trained by
    the run (freeze the backbone; train heads or nothing).

    Args:
        bank: the bank directory to watch (another process may be adding to it).
        base: the base weights, to check the model against once; ``None`` trusts
            that the model starts as the base (each skill's base fingerprint is
            still checked against it).
        every_n_steps: also look after every ``n`` training steps (and every ``n``
            predict batches); ``None``: only at the start of each stage.
        on_validation_start: look at the start of every validation run.
        skills: stitch only these names (in bank order); ``None``: every skill.
        model_attr: the LightningModule attribute holding the model; ``None``, or a
            module without ``model``, means the LightningModule itself.
        rule: how overlapping skills combine (``"mean"``, ``"sum"``, ``"sign_mean"``;
            see :mod:`skillbank.stitching.overlap`), checked here.
        switch_by: serving mode: in validation, test and predict every batch is
            answered by the one skill it names under this key (a name, or a list of
            one repeated name; :func:`~skillbank.stitching.switching.group_by_skill` groups mixed
            data), with that skill's head.
        dataloader_skills: serving mode by dataloader: batches of dataloader ``i``
            are answered by skill ``dataloader_skills[i]`` (Lightning's multiple
            dataloaders, one per skill).

    Serving mode stitches no skill for good: before each batch the model is
    switched to the batch's skill (:meth:`~skillbank.Stitcher.switch` rewrites only
    the masks that leave and arrive) and its head is swapped in; when the stage
    ends the model holds the base again. The bank is looked at at the same
    moments as otherwise, so skills banked meanwhile become servable at the next
    look; a batch naming a skill not seen at the last look is an error.

    Heads: the callback keeps them (:attr:`heads`, ``{name: head tensors}``) and
    :meth:`use_head` swaps one in, so each task is evaluated with its own head;
    nothing is written onto the user's module, which reaches them through
    ``SkillStitcher.find(self.trainer)``.
    Resumable: the checkpoint records which skills are stitched and the base
    values under them, so a resumed run carries on without stitching twice.
    Under DDP rank 0 reads the manifest and broadcasts it: all ranks stitch the
    same skills in the same order.
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
        switch_by: str | None = None,
        dataloader_skills: Sequence[str] | None = None,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise SkillbankError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}.")
        if Path(bank).exists() and not Path(bank).is_dir():
            raise SkillbankError(f"bank path {bank} is a file, not a directory.")
        self.bank, self.base, self.every_n_steps = Path(bank), base, every_n_steps
        self.look_on_validation_start = on_validation_start
        self.skills = None if skills is None else list(skills)
        self.model_attr = model_attr
        self.rule = get_rule(rule).name  # fail fast on an unknown name
        if switch_by is not None and dataloader_skills is not None:
            raise SkillbankError("give switch_by= (a batch key) or dataloader_skills= (one skill per dataloader), not both.")
        self.switch_by = switch_by
        self.dataloader_skills = None if dataloader_skills is None else list(dataloader_skills)
        self.servable: list[str] = []  # serving mode: the skills found at the last look
        self._head: AbstractContextManager[nn.Module] | None = None
        self.history: list[tuple[str, int]] = []  # (skill, global step) as stitched
        self._stitcher: Stitcher | None = None
        self._restored: list[str] = []
        self._restored_base: dict[str, dict[str, Tensor]] | None = None
        self._warned: set[str] = set()
        self._latest_step = 0  # the global step of the last look after training batches

    # -- public ------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bank=str(self.bank))

    @property
    def stitched(self) -> list[str]:
        """Names of the stitched skills, in order."""
        return self._stitcher.stitched if self._stitcher is not None else list(self._restored)

    @staticmethod
    def find(trainer: pl.Trainer) -> SkillStitcher:
        """The trainer's one ``SkillStitcher``: how a LightningModule reaches the stitched skills' heads
        (``SkillStitcher.find(self.trainer).use_head(name)``) without the callback writing onto it."""
        found = [c for c in trainer.callbacks if isinstance(c, SkillStitcher)]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise SkillbankError(
                f"the trainer has {len(found)} SkillStitcher callbacks; SkillStitcher.find needs exactly one "
                "(pass Trainer(callbacks=[SkillStitcher(...)]), or keep a reference to the one you want)."
            )
        return found[0]

    @property
    def heads(self) -> dict[str, dict[str, Tensor]]:
        """Each stitched skill's head tensors."""
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

    @property
    def serving(self) -> bool:
        """Whether batches are answered by the skill they name (``switch_by`` or ``dataloader_skills``)."""
        return self.switch_by is not None or self.dataloader_skills is not None

    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at: str | None = None) -> list[str]:
        """Stitch every skill of the bank not stitched yet (serving mode: only note them as servable);
        returns their names (the same on every rank). ``at`` says when, as the stage counts (for the log:
        ``"after predict batch 9"``; default the optimizer step)."""
        stitcher = self._ensure_stitcher(pl_module)
        known = self.servable if self.serving else stitcher.stitched
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
            raise SkillbankError(f"SkillStitcher could not read {self.bank}: {error}")
        if new and stitcher.bank is None:  # the bank exists now (it is never created here)
            stitcher.bank = SkillBank(self.bank, create=False)
        if self.serving:
            self.servable += new
            return new
        for name in new:
            stitcher.add(name)
            self.history.append((name, trainer.global_step))
            when = at or f"at step {trainer.global_step}"
            rank_zero_info(f"SkillStitcher: stitched {name!r} {when} ({len(stitcher)} skills)")
        return new

    def _bank_names(self) -> list[str]:
        """The bank's skill names (none while it does not exist: it is never created here), warning once
        about a missing bank and about requested skills it does not hold."""
        bank = SkillBank.if_exists(self.bank)
        if bank is None:
            self._warn_once(
                "no bank",
                f"SkillStitcher: there is no bank at {self.bank} (yet), so nothing is stitched. It "
                "is looked at again at each look; check the path unless another run is about to fill it.",
            )
            return []
        names = bank.names()
        missing = [n for n in self.skills or [] if n not in names]
        if missing:
            self._warn_once(
                f"missing {missing}",
                f"SkillStitcher: {missing} are not in {self.bank} (yet; it holds "
                f"{names or 'no skills'}), so they are not stitched; they will be when they arrive. Check the "
                "names unless they are coming.",
            )
        return names

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

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
        self._release()
        if self.should_update(batch_idx, trainer.current_epoch):
            self.update(trainer, pl_module, f"after predict batch {batch_idx}")

    # -- serving mode ----------------------------------------------------------

    def skill_of(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> str:
        """The skill that answers ``batch`` in serving mode."""
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

    def _serve(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not self.serving:
            return
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
        if self.serving and self._stitcher is not None:
            self._stitcher.switch([])

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._serve(trainer, pl_module, batch, batch_idx, dataloader_idx)

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
        self._serve(trainer, pl_module, batch, batch_idx, dataloader_idx)

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
        self._serve(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._back_to_base()

    # -- resuming ------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stitched": self.stitched, "bank": str(self.bank), "rule": self.rule}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_rule = state_dict.get("rule", "mean")
        if state_dict["stitched"] and saved_rule != self.rule:
            raise SkillbankError(
                f"the checkpoint's skills were stitched with rule {saved_rule!r}, this SkillStitcher uses {self.rule!r}; "
                f"resume with SkillStitcher(rule={saved_rule!r})."
            )
        self._restored = list(state_dict["stitched"])
        self._stitcher = None  # the restored weights already hold these skills; rebuilt at the next look

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._stitcher is not None and len(self._stitcher):
            values = self._stitcher.base_values()
            checkpoint[self._base_key] = {n: {"indices": i, "values": v} for n, (i, v) in values.items()}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored_base = checkpoint.get(self._base_key)

    @property
    def _base_key(self) -> str:
        return f"{self.state_key}:base_values"

    def _ensure_stitcher(self, pl_module: pl.LightningModule) -> Stitcher:
        """The stitcher; after a restore, the model is first put back to its base and the skills re-stitched in order."""
        if self._stitcher is not None:
            return self._stitcher
        model = wrapped_model(pl_module, self.model_attr)
        if self._restored and self._restored_base is None:
            raise SkillbankError(
                "the checkpoint lists stitched skills but not the base values under them; it was not written by SkillStitcher."
            )
        if self._restored_base:
            state = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, saved in self._restored_base.items():
                    flat = state[name].data.view(-1)
                    flat.index_copy_(0, saved["indices"].to(flat.device), saved["values"].to(flat.device, flat.dtype))
        self._stitcher = Stitcher(model, self.base, bank=SkillBank.if_exists(self.bank), rule=self.rule)
        for name in self._restored:
            self._stitcher.add(name)
        self._restored, self._restored_base = [], None
        return self._stitcher

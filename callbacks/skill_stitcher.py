"""SkillStitcher: stitch every new skill of a bank into a running model, as the skills arrive."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from skillbank.callbacks._bank_watch import BankWatcher
from skillbank.callbacks._model import wrapped_model
from skillbank.errors import SkillbankError
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.stitching.stitcher import Stitcher
from skillbank.vectors.weights import WeightsSource

__all__ = ["SkillStitcher"]


class SkillStitcher(BankWatcher):
    """Looks at a bank at set moments of a fit, validate, test or predict run and stitches what is new.

    Each skill is stitched once, in bank order, with :class:`~skillbank.Stitcher`:
    entries outside its mask stay bitwise unchanged, earlier skills are never
    re-applied or re-localized. The stitched parameters must not be trained by
    the run (freeze the backbone; train heads or nothing). To answer each batch with
    its own skill instead, use :class:`~skillbank.callbacks.SkillSwitcher`.

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
            see :mod:`skillbank.stitching.overlap`), or a composition of each weight matrix from every skill
            touching it (``"tsv_m"``, ``"iso_c"``, ``"iso_cts"``: a
            :class:`~skillbank.stitching.spectral_stitcher.SpectralStitcher`, which recomputes the matrices a
            new skill touches; its checkpoint holds those matrices' base values whole), checked here.
        scale: with a matrix composition, the composed matrices' scale (chosen on validation data).

    Heads: the callback keeps them (:attr:`heads`, ``{name: head tensors}``) and
    :meth:`use_head` swaps one in, so each task is evaluated with its own head;
    nothing is written onto the user's module, which reaches them through
    ``SkillStitcher.find(self.trainer)``.
    Resumable: the checkpoint records which skills are stitched and the base
    values under them, so a resumed run carries on without stitching twice.
    Under DDP rank 0 reads the manifest and broadcasts it: all ranks stitch the
    same skills in the same order.
    """

    _stitcher: Stitcher | SpectralStitcher | None  # declared here too: mypy sees the base class as Any

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
        super().__init__(bank, base, every_n_steps, on_validation_start, skills, model_attr, rule, scale)
        self.history: list[tuple[str, int]] = []  # (skill, global step) as stitched
        self._restored: list[str] = []
        self._restored_base: dict[str, dict[str, Tensor]] | None = None

    @property
    def stitched(self) -> list[str]:
        """Names of the stitched skills, in order."""
        return self._stitcher.stitched if self._stitcher is not None else list(self._restored)

    @override
    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at: str | None = None) -> list[str]:
        """Stitch every skill of the bank not stitched yet; returns their names (the same on every rank). ``at``
        says when, as the stage counts (for the log: ``"after predict batch 9"``; default the optimizer step)."""
        stitcher = self._ensure_stitcher(pl_module)
        new = self.new_names(trainer, pl_module, stitcher.stitched)
        for name in new:
            stitcher.add(name)
            self.history.append((name, trainer.global_step))
            when = at or f"at step {trainer.global_step}"
            rank_zero_info(f"SkillStitcher: stitched {name!r} {when} ({len(stitcher)} skills)")
        return new

    # -- resuming ------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stitched": self.stitched, "bank": str(self.bank), "rule": self.rule, "scale": self.scale}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_rule, saved_scale = state_dict.get("rule", "mean"), state_dict.get("scale", 1.0)
        if state_dict["stitched"] and (saved_rule, saved_scale) != (self.rule, self.scale):
            raise SkillbankError(
                f"the checkpoint's skills were stitched with rule {saved_rule!r} (scale {saved_scale:g}), this "
                f"SkillStitcher uses {self.rule!r} (scale {self.scale:g}); resume with "
                f"SkillStitcher(rule={saved_rule!r}, scale={saved_scale:g})."
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

    @override
    def _ensure_stitcher(self, pl_module: pl.LightningModule) -> Stitcher | SpectralStitcher:
        """The stitcher; after a restore, the model is first put back to its base and the skills re-stitched in order."""
        if self._stitcher is not None:
            return self._stitcher
        if self._restored and self._restored_base is None:
            raise SkillbankError(
                "the checkpoint lists stitched skills but not the base values under them; it was not written by SkillStitcher."
            )
        if self._restored_base:
            state = wrapped_model(pl_module, self.model_attr).state_dict(keep_vars=True)
            with torch.no_grad():
                for name, saved in self._restored_base.items():
                    flat = state[name].data.view(-1)
                    flat.index_copy_(0, saved["indices"].to(flat.device), saved["values"].to(flat.device, flat.dtype))
        stitcher = super()._ensure_stitcher(pl_module)
        for name in self._restored:
            stitcher.add(name)
        self._restored, self._restored_base = [], None
        return stitcher

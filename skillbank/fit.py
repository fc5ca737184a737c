"""``skillbank fit`` / ``skillbank validate``: LightningCLI over any LightningModule and DataModule, configured from ``configs/``.

``skillbank fit --config configs/mask_demo.yaml`` learns a mask with
:class:`~skillbank.mask_learner.MaskLearner`; the same command runs an ordinary
finetune that banks its skill (``configs/finetune_harvest.yaml``), and
``skillbank validate`` evaluates a model with bank skills stitched in
(``configs/serve_stitch.yaml``). ``--print_config``
shows every setting with its default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from skillbank.errors import SkillbankError

__all__ = ["run_lightning"]


def run_lightning(subcommand: str, argv: Sequence[str]) -> int:
    """Run LightningCLI's ``subcommand`` (``fit``, ``validate``) with ``argv`` (e.g. ``["--config", "configs/mask_demo.yaml"]``)."""
    try:
        _cli([subcommand, *argv])
    except ValueError as exc:  # jsonargparse wraps errors raised while building the classes
        cause = _skillbank_cause(exc)
        if cause is None:
            raise
        raise cause from None
    return 0


def _skillbank_cause(exc: BaseException) -> SkillbankError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SkillbankError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cli(argv: Sequence[str]) -> LightningCLI:
    command_line, sys.argv = sys.argv, sys.argv[:1]  # the arguments come as args=; LightningCLI warns when both are set
    try:
        return _lightning_cli(argv)
    finally:
        sys.argv = command_line


def _lightning_cli(argv: Sequence[str]) -> LightningCLI:
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # MaskLearner and SequenceClassifier bring their own
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=list(argv),
        parser_kwargs={"prog": "skillbank", "description": "Train a LightningModule (e.g. skillbank.MaskLearner) from a YAML config in configs/."},
    )

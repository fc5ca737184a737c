"""``skillbank fit`` / ``skillbank validate``: LightningCLI over any LightningModule and DataModule, configured from ``configs/``.

``skillbank fit --config configs/mask_demo.yaml`` learns a mask with
:class:`~skillbank.localization.mask_learner.MaskLearner`; the same command runs an ordinary
finetune that banks its skill (``configs/finetune_harvest.yaml``), and
``skillbank validate`` evaluates a model with bank skills stitched in
(``configs/serve_stitch.yaml``). ``--print_config``
shows every setting with its default.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from skillbank.errors import SkillbankError

__all__ = ["resolve_pulled", "run_lightning"]


def run_lightning(subcommand: str, argv: Sequence[str]) -> int:
    """Run LightningCLI's ``subcommand`` (``fit``, ``validate``) with ``argv`` (e.g. ``["--config", "configs/mask_demo.yaml"]``)."""
    try:
        _cli([subcommand, *argv])
    except pickle.UnpicklingError:  # --ckpt_path: torch's weights-only loader refused what the file holds
        raise SkillbankError(
            f"the checkpoint {_ckpt_path(argv)} holds objects torch's safe (weights-only) loader refuses, such as code "
            "that would run on loading; nothing in it was run. Pass a checkpoint a Lightning run of yours saved, or none."
        ) from None
    except ValueError as exc:  # jsonargparse wraps errors raised while building the classes
        cause = _skillbank_cause(exc)
        if cause is None:
            raise
        raise cause from None
    return 0


def _ckpt_path(argv: Sequence[str]) -> str:
    """The ``--ckpt_path`` given in ``argv`` (as typed), for messages."""
    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
    return "(from the config)"


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


def resolve_pulled(value: object) -> object:
    """``value`` with every ``pulled:<alias>`` string in it (nested in namespaces, dicts and lists) replaced by the
    model's folder, pulled on first use: configs name pulled models, the classes they build take folders."""
    if isinstance(value, str):
        from skillbank.integrations.pulled.wheels import PULLED, resolve_model

        return resolve_model(value) if value.startswith(PULLED) else value
    if isinstance(value, argparse.Namespace):
        for key, item in vars(value).items():
            setattr(value, key, resolve_pulled(item))
        return value
    if isinstance(value, dict):
        return {key: resolve_pulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_pulled(item) for item in value]
    return value


class _SkillbankCLI(LightningCLI):
    """LightningCLI that resolves pulled models' aliases once, in the launching process, before building any class."""

    def before_instantiate_classes(self) -> None:
        resolve_pulled(self.config)


def _lightning_cli(argv: Sequence[str]) -> LightningCLI:
    return _SkillbankCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # MaskLearner and SequenceClassifier bring their own
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=list(argv),
        parser_kwargs={
            "prog": "skillbank",
            "description": "Train a LightningModule (e.g. skillbank.MaskLearner) from a YAML config in configs/.",
        },
    )

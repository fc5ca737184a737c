"""Child script of the FSDP2 tests: learn one mask with the learner's state sharded over CPU processes.

``python tests/localization/mask_fsdp_run.py DEVICES BANK MODE [EPOCHS] [RESUME]``, after
``mask_ddp_run.py prepare BANK`` wrote the finetune ``BANK.finetuned``. ``DEVICES`` 1 runs the
flat learner in one process (the reference), more run ``ModelParallelStrategy`` with every
process data-parallel; Lightning relaunches the script once per extra rank. ``MODE`` is
``full`` (every entry scored), ``pool`` (a pool of 10·k, half of the entries) or ``best`` (a pool, keeping the
best-validating mask, a checkpoint every epoch in ``BANK.ckpt``; the validation metric is
scripted to peak at epoch :data:`BEST_EPOCH`, so the mask kept is not the last one).
``RESUME`` (``best`` only): the checkpoint to resume from. With ``FSDP_ACCELERATOR=gpu`` in the
environment the run is sharded on GPUs, one process included (``pytest -m cuda``). Full-batch updates (see
``mask_ddp_run.py``). Rank 0 writes the final scores (flat, in the flat learner's order)
to ``BANK.scores.pt`` and the run's summary to ``BANK.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric
from transformers import BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from mask_ddp_run import GLOBAL_BATCH  # noqa: E402

from helpers.ddp_teardown import teardown  # noqa: E402
from helpers.models import learned, tiny_config  # noqa: E402
from skillbank import MaskLearner  # noqa: E402
from skillbank.localization.fewshot import balanced_indices  # noqa: E402
from skillbank.sharding import reshard  # noqa: E402
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset  # noqa: E402

BEST_EPOCH = 2
TRAINER: list[pl.Trainer] = []  # the run's trainer, for the scripted metric (module-level: the learner deep-copies metrics)


class ScriptedMetric(Metric):
    """A validation "accuracy" of 1.0 at :data:`BEST_EPOCH` and 0.5 at every other epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("value", default=torch.tensor(0.0), dist_reduce_fx="max")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.value = torch.tensor(1.0 if TRAINER[0].current_epoch == BEST_EPOCH else 0.5)

    def compute(self) -> torch.Tensor:
        return self.value


def flat_scores(learner: MaskLearner) -> torch.Tensor:
    """The scores in the flat learner's order (sharded ones gathered: a collective, every rank calls it)."""
    if learner.shards is None:
        return learner.scores.detach().clone()
    reshard(learner.model)  # after validation FSDP keeps the root gathered
    return torch.cat([s.full_tensor().detach() for s in learner.shards.scores()])


def main(devices: int, bank: str, mode: str, epochs: int, resume: str | None) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    ids, labels = DEMO_TASKS[0].sample(400, torch.Generator().manual_seed(0))
    finetuned = BertForSequenceClassification.from_pretrained(f"{bank}.finetuned")
    few = Subset(TokenDataset(ids, labels), balanced_indices(labels, 64, seed=0))
    loader = DataLoader(few, batch_size=GLOBAL_BATCH // devices, shuffle=False)
    val = DataLoader(Subset(TokenDataset(ids, labels), range(256, 400)), batch_size=GLOBAL_BATCH // devices)
    pool = None if mode == "full" else 10.0
    spec = learned(0.05, full_batch=True, lr=0.5, keep_best=mode == "best", pool=pool)
    metric = ScriptedMetric() if mode == "best" else None
    learner = MaskLearner(finetuned, base, spec=spec, bank=bank, skill_name="sentiment", metric=metric)
    accelerator = os.environ.get("FSDP_ACCELERATOR", "cpu")
    sharded = devices > 1 or accelerator == "gpu"
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if sharded else "auto"
    callbacks = [ModelCheckpoint(dirpath=f"{bank}.ckpt", save_last=True, save_top_k=0)] if mode == "best" else []
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=mode == "best",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    TRAINER.append(trainer)
    trainer.fit(learner, loader, val, ckpt_path=resume)
    scores = flat_scores(learner)
    last = None  # the mask of the final scores, to tell it from the best one kept
    if learner.shards is not None and mode == "best":
        last = learner.shards.regions(learner.shards.choose(learner.k)[0])
    if trainer.is_global_zero:
        torch.save(scores, f"{bank}.scores.pt")
        assert learner.skill is not None
        summary = {
            "selected_epoch": learner.skill.metadata.settings["selected_epoch"],
            "val_acc": float(trainer.callback_metrics["val_acc"]),
            "best_val_acc": learner.skill.metadata.metrics.get("val_acc"),
            "state_nbytes": learner.state_nbytes,
            "last_equals_kept": last is not None
            and all(torch.equal(last[n].indices, r.indices) for n, r in learner.skill.regions.items() if n in last),
        }
        Path(f"{bank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 40, (sys.argv[5:] or [None])[0])
    teardown()

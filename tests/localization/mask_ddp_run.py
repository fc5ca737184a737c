"""Child script of the DDP test: learn one mask with ``devices`` CPU processes and add it to a bank.

Run ``python tests/localization/mask_ddp_run.py prepare BANK`` once (writes the finetune
``BANK.finetuned``), then ``python tests/localization/mask_ddp_run.py DEVICES BANK``; Lightning
relaunches the script once per extra rank. Lightning reshuffles a DDP training
loader (DistributedSampler), so per-batch updates would see other batches than a
single process does; the learner therefore runs full-batch (one update per pass
over the 128-example few-shot set), whose gradient does not depend on how the set
is split. Rank 0 saves the final scores to ``BANK.scores.pt``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset
from transformers import BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers.ddp_teardown import teardown  # noqa: E402
from helpers.models import finetune_like, learned, tiny_config  # noqa: E402
from skillbank import MaskLearner  # noqa: E402
from skillbank.localization.fewshot import balanced_indices  # noqa: E402
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset  # noqa: E402

GLOBAL_BATCH = 32


def quick_finetune(base: BertModel, dataset: TokenDataset, steps: int = 60) -> BertForSequenceClassification:
    """A real (short) Adam finetune, so that the mask has something to learn."""
    model = finetune_like(base, seed=1, scale=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = iter(())
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def prepare(bank: str) -> None:
    """Write the base's quick finetune beside ``bank``: every run then reads the same τ."""
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    ids, labels = DEMO_TASKS[0].sample(400, torch.Generator().manual_seed(0))
    quick_finetune(base, TokenDataset(ids, labels)).save_pretrained(f"{bank}.finetuned")


def main(devices: int, bank: str) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    ids, labels = DEMO_TASKS[0].sample(400, torch.Generator().manual_seed(0))
    dataset = TokenDataset(ids, labels)
    finetuned = BertForSequenceClassification.from_pretrained(f"{bank}.finetuned")
    few = Subset(dataset, balanced_indices(labels, 64, seed=0))
    loader = DataLoader(few, batch_size=GLOBAL_BATCH // devices, shuffle=False)
    val = DataLoader(Subset(dataset, range(256, 400)), batch_size=GLOBAL_BATCH // devices)
    learner = MaskLearner(
        finetuned, base, spec=learned(0.05, full_batch=True, lr=0.5, keep_best=False), bank=bank, skill_name="sentiment"
    )  # compare the final masks, not a best epoch
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(learner, loader, val)
    if trainer.is_global_zero:
        torch.save(learner.scores.detach(), f"{bank}.scores.pt")


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2])
    else:
        main(int(sys.argv[1]), sys.argv[2])
        teardown()

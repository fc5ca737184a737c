"""The README's "The callbacks in a finetuning run": a finetuning run banks its skill when it ends (SkillHarvester),
and a run that serves the base stitches every banked skill before validating (SkillStitcher).

    python examples/callbacks.py [WORKDIR]      # default: ./callbacks-example

The base folder is a tiny one made by ``tiny_models`` (swap in your own).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import TASKS, fresh_bank, loader, quiet_trainer, tiny_models
from transformers import BertForSequenceClassification

from skillbank.callbacks import SkillHarvester, SkillStitcher
from skillbank.integrations.classifier import SequenceClassifier
from skillbank.testbed.synthetic import DEMO_TASKS


def main(workdir: Path) -> None:
    base, _ = tiny_models(workdir)
    bank = fresh_bank(workdir / "skills", ("sentiment-run", "topic-run"))
    for task, name in (("sentiment", "sentiment-run"), ("topic", "topic-run")):
        torch.manual_seed(0)
        labels = DEMO_TASKS[TASKS[task]].num_labels
        module = SequenceClassifier(str(base), num_labels=labels, lr=1e-3)
        harvest = SkillHarvester(bank.path, name, sparsity=0.05, task=task)  # captures the base at set-up
        quiet_trainer(max_steps=120, callbacks=[harvest]).fit(module, loader(task, n=512, seed=5), loader(task, seed=6))
        print(
            f"banked {name!r}: {bank.get(name).num_entries:,} entries, finetuned val_acc "
            f"{bank.get(name).metadata.metrics['val_acc']:.3f}"
        )

    topic_labels = DEMO_TASKS[TASKS["topic"]].num_labels
    serving = SequenceClassifier(
        BertForSequenceClassification.from_pretrained(base, num_labels=topic_labels).eval(),
        num_labels=topic_labels,
        skill_head="topic-run",
    )  # validated with topic's own head
    stitch = SkillStitcher(bank.path, base=str(base))  # stitches every skill the bank holds at each validation start
    metrics = quiet_trainer(callbacks=[stitch]).validate(serving, loader("topic", n=256, seed=7), verbose=False)[0]
    print(f"serving {stitch.stitched}: topic val_acc {metrics['val_acc']:.3f} with both skills stitched")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "callbacks-example"))

"""docs/methods.md's "Overlap rules, skills sized by what they keep, masks learned in context": a skill sized by the
validation accuracy it keeps, a stitcher that combines overlapping skills by a named rule, and a second skill's mask
learned against the model it will join.

    python examples/overlap_rules.py [WORKDIR]      # default: ./overlap-rules-example

The base and finetuned folders are tiny ones made by ``tiny_models`` (swap in your own).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny_models import fresh_bank, loader, quiet_trainer, tiny_models
from transformers import BertForSequenceClassification

from skillbank import LearnerSpec, LocalizationSpec, MaskLearner, Stitcher, task_vector
from skillbank.localization.auto_sparsity import localize_auto
from skillbank.stitching.heads import accuracy


def main(workdir: Path) -> None:
    base, finetuned = tiny_models(workdir)
    bank = fresh_bank(workdir / "skills", ("sentiment-auto", "topic-in-context"))

    # the smallest size (on the grid 0.1% ... 100%) whose skill alone keeps 99% of the finetune's validation accuracy
    tv = task_vector(base, finetuned["sentiment"])
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)  # the base; the skill's head fits it
    skill = localize_auto(tv, model, loader("sentiment", seed=2), name="sentiment-auto", target=0.99)  # model: base again
    bank.add(skill)
    print(
        f"sentiment-auto: sparsity {skill.metadata.sparsity:g} keeps {skill.metadata.metrics['val_recovery']:.3f} "
        f"of the finetune, tried {len(skill.metadata.settings['auto']['tried'])} sizes"
    )

    stitcher = Stitcher(model, base, bank=bank, rule="mean")  # how overlaps combine: mean (the paper's), sum, sign_mean
    stitcher.add("sentiment-auto")

    # learn the next skill's mask against the model it will join: the skills stitched so far, combined by the
    # stitcher's rule (mean and sum have a differentiable form; sign_mean does not, and is refused here)
    learner = MaskLearner(
        str(finetuned["topic"]),
        str(base),
        spec=LocalizationSpec(method="learned", sparsity=0.05, learner=LearnerSpec(rule=stitcher.rule.name)),
        context=[bank.get(n) for n in stitcher.stitched],
        bank=str(bank.path),
        skill_name="topic-in-context",
    )
    trainer = quiet_trainer(max_epochs=learner.recipe.epochs)
    trainer.fit(learner, loader("topic", n=64, seed=1), loader("topic", seed=2))  # banks the skill at the end
    stitcher.add("topic-in-context")
    scores = []
    for task, name in (("sentiment", "sentiment-auto"), ("topic", "topic-in-context")):
        with stitcher.use_head(name) as m:
            scores.append(f"{task} {accuracy(m, loader(task, n=256, seed=99)):.3f}")
    context = bank.get("topic-in-context").metadata.settings["context"]
    print(f"rule {stitcher.rule.name}, both stitched: {', '.join(scores)} (topic's mask learned in the context of {context})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "overlap-rules-example"))

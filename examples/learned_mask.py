"""docs/methods.md's "Learned masks": learn a skill's mask on a few labelled examples with a Lightning Trainer and bank it,
then the same with a candidate pool (state over the top 30·k entries of |τ| only).

    python examples/learned_mask.py [WORKDIR]      # default: ./learned-mask-example

The base and finetuned folders are tiny ones made by ``tiny_models`` (swap in your own).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny_models import fresh_bank, loader, quiet_trainer, tiny_models

from skillbank import LearnerSpec, LocalizationSpec, MaskLearner, Stitcher
from skillbank.stitching.heads import accuracy


def main(workdir: Path) -> None:
    base, finetuned = tiny_models(workdir)
    bank = fresh_bank(workdir / "skills", ("topic-learned", "topic-pooled"))
    few_shot, val, test = loader("topic", n=64, seed=1), loader("topic", n=128, seed=2), loader("topic", n=256, seed=3)
    for name, pool in (("topic-learned", None), ("topic-pooled", 30)):
        spec = LocalizationSpec(method="learned", sparsity=0.02, learner=LearnerSpec(pool=pool))
        learner = MaskLearner(str(finetuned["topic"]), str(base), spec=spec, bank=str(bank.path), skill_name=name)
        # the name is checked before training
        trainer = quiet_trainer(max_epochs=learner.recipe.epochs)
        trainer.fit(learner, few_shot, val)  # keeps the best-validating mask; adds the skill to the bank at the end
        model = learner.model  # the finetuned classifier, reset to the base in its shared parameters
        stitcher = Stitcher(model, str(base), bank=bank)
        stitcher.add(name)
        with stitcher.use_head(name) as m:
            print(
                f"{name}: {bank.get(name).num_entries:,} entries, base + skill {accuracy(m, test):.3f}, "
                f"scored {learner.scores.numel():,} of {learner.num_eligible:,} entries"
            )
        stitcher.remove(name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "learned-mask-example"))

"""The README's "Add tasks over time", end to end: localize a finetune, keep it in a bank, stitch it onto the base, answer with
its own head, take it out again.

    python examples/quickstart.py [WORKDIR]      # default: ./quickstart-example

The base and finetuned folders are tiny ones made by ``tiny_models`` (swap in your own).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import loader, tiny_models
from transformers import BertForSequenceClassification

from skillbank import SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.stitching.heads import accuracy


def main(workdir: Path) -> None:
    base, finetuned = tiny_models(workdir)
    test = loader("sentiment", n=256, seed=99)

    tv = task_vector(base, finetuned["sentiment"])  # folders, .safetensors, modules or state dicts
    skill = localize_dataless(tv, 0.1, name="sentiment")  # top 10% of |τ|, plus the dense head
    bank = SkillBank(workdir / "skills")  # a directory; created if missing
    if "sentiment" in bank:  # a rerun: replace the earlier copy
        bank.remove("sentiment")
    bank.add(skill)  # atomic, fsynced, sha256-checked

    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stitcher = Stitcher(model, base, bank=bank)  # checks the model is the base
    for name in bank.names():
        stitcher.add(name)  # O(skill size), whatever is stitched already
    with stitcher.use_head("sentiment") as m:  # evaluate the task with its own head
        stitched = accuracy(m, test)
    stitcher.remove("sentiment")  # exact: its entries return to the base
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    finetuned_acc = accuracy(BertForSequenceClassification.from_pretrained(finetuned["sentiment"]), test)
    print(
        f"sentiment: finetuned {finetuned_acc:.3f}, base + its {skill.num_entries:,}-entry skill {stitched:.3f}; "
        f"removed again, the model is the base bit for bit"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-example"))

"""The README's "Serving" (switching and routing): one base in memory answers each task with its own skill and head,
switched exactly; requests that do not name their task are routed by the base's features.

    python examples/switching.py [WORKDIR]       # default: ./switching-example
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import TASKS, loader, tiny_models
from transformers import BertForSequenceClassification, BertModel

from skillbank import SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.stitching.heads import accuracy
from skillbank.stitching.routing import SkillRouter, mean_pooled_features, routing_centroids, with_routing


def main(workdir: Path) -> None:
    base, finetuned = tiny_models(workdir)
    encoder = BertModel.from_pretrained(base).eval()  # the base: routing reads its features
    bank = SkillBank(workdir / "skills")
    for task in TASKS:
        if task not in bank:  # each skill carries centroids of its examples
            skill = localize_dataless(task_vector(base, finetuned[task]), 0.3, name=task)  # tiny Adam finetunes: big masks
            bank.add(with_routing(skill, routing_centroids(encoder, loader(task, n=64, seed=1))))

    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    stitcher = Stitcher(model, base, bank=bank)
    stitcher.switch(["sentiment"])  # hold exactly these skills
    for task in TASKS:
        with stitcher.active(task) as m:  # for one block: this skill and its head, then back
            print(f"{task}: its own skill and head {accuracy(m, loader(task, n=256, seed=99)):.3f}")
    assert stitcher.stitched == ["sentiment"]

    # for serving: check and lay out each skill on the model's device once (on CUDA with Triton, one kernel an add)
    ready = {name: stitcher.prepare(name) for name in bank.names()}
    with stitcher.active(ready["topic"]) as m:
        print(f"topic, prepared: its own skill and head {accuracy(m, loader('topic', n=256, seed=99)):.3f}")

    router = SkillRouter([bank.get(n) for n in bank.names()])  # a clear error if a skill has no routing data
    right = total = 0
    for task in TASKS:
        for batch in loader(task, n=128, seed=7):
            names = router.route(mean_pooled_features(encoder, batch))  # one base forward per batch
            right += sum(n == task for n in names)
            total += len(names)
    print(f"routed to their own task's skill: {right / total:.3f} of {total} requests")
    stitcher.switch([])  # the base again, bit for bit
    with torch.no_grad():
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "switching-example"))

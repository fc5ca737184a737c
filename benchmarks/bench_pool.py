"""Candidate-pool mask learning against full scoring on the real benchmark (issue 16).

    python benchmarks/bench_pool.py --work /tmp/real --tasks sentiment,subjectivity,spam,tweets [--pool 10]

Needs the real benchmark's finetunes in --work (``bench_real.py --stages pull,finetune``).
For each task, learns the 1% mask twice with the benchmark's recipe (a Trainer, the
best-validating mask): scoring every entry, and scoring only the top ``pool · k`` of |τ|
(``LearnerSpec(pool=...)``); then tests each skill alone and the skills of all tasks
stitched, normalized by the finetuned accuracy. Also: the learner's state bytes (τ, scores,
Adam's two moments, the pool's positions) and the median time of a training step of each,
the two alternated on one task. Writes ``pool.json`` into --work (results under "full" and "pool <c>").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench_real import Bench, _alone, _fewshot_loader, _quiet, _stitched, build_parser, learn_skill
from skillbank import SkillBank
from skillbank.localization.mask_learner import MaskLearner
from skillbank.localization.spec import LearnerSpec, LocalizationSpec


def step_times(b: Bench, name: str, base: dict, pool: float, steps: int = 12) -> dict[str, float]:
    """Median seconds of a training step (forward, backward, Adam) of each learner, alternated step by step."""
    finetuned = str(b.finetuned_dir(name))
    specs = {
        "full": LocalizationSpec(method="learned", sparsity=b.args.sparsity),
        "pool": LocalizationSpec(method="learned", sparsity=b.args.sparsity, learner=LearnerSpec(pool=pool)),
    }
    learners = {k: MaskLearner(finetuned, base, finetuned, spec, num_labels=b.task(name).num_labels) for k, spec in specs.items()}
    optimizers = {k: v.configure_optimizers() for k, v in learners.items()}
    batches = list(_fewshot_loader(b, name, 0))
    times: dict[str, list[float]] = {k: [] for k in learners}
    for i in range(steps):
        for key, learner in learners.items():
            learner.train()
            start = time.perf_counter()
            learner._step(batches[i % len(batches)], 0, 1, optimizers[key], lambda loss: loss.backward())
            times[key].append(time.perf_counter() - start)
    return (
        {k: statistics.median(v[2:]) for k, v in times.items()}
        | {f"state_bytes_{k}": v.state_nbytes for k, v in learners.items()}
        | {"shared_entries": learners["full"].tau.numel()}
    )


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--pool", type=float, default=10.0)
    ours, rest = extra.parse_known_args()
    args = build_parser().parse_args(rest)
    _quiet()
    b = Bench(args)
    live = b.classifier()
    base = b.base_state(live)
    out = b.read("pool.json")
    label = f"pool {ours.pool:g}"
    banks = {
        "full": SkillBank(b.work / "banks" / "pool-bench-full"),
        label: SkillBank(b.work / "banks" / f"pool-bench-{ours.pool:g}"),
    }
    for name in b.tasks:
        for key, bank in banks.items():
            if name not in bank:
                kwargs = {"pool": ours.pool} if key == label else {}
                skill, seconds = learn_skill(b, name, args.sparsity, base, **kwargs)
                bank.add(skill)
                out.setdefault("learn_seconds", {}).setdefault(key, {})[name] = round(seconds, 1)
                b.write("pool.json", out)
                print(f"  {key:<8} {name:<13} learned in {seconds:.0f} s", file=sys.stderr)
    finetuned = b.read("finetune.json")
    for key, bank in banks.items():
        alone, stitched = _alone(b, live, base, bank), _stitched(b, live, base, bank)
        out[key] = {
            "alone": alone,
            "stitched": stitched,
            "alone_normalized": statistics.mean(alone[n] / finetuned[n]["test_acc"] for n in b.tasks),
            "stitched_normalized": statistics.mean(stitched[n] / finetuned[n]["test_acc"] for n in b.tasks),
        }
        print(f"  {key:<8} alone {out[key]['alone_normalized']:.4f}  stitched {out[key]['stitched_normalized']:.4f}")
    out.setdefault("step", {})[label] = step_times(b, b.tasks[0], base, ours.pool)
    out["tasks"] = b.tasks
    b.write("pool.json", out)
    print(json.dumps(out["step"][label], indent=1))


if __name__ == "__main__":
    main()

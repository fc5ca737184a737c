"""A skill whose entries form one contiguous run (a whole tensor) against one the same size spread out: Stitcher add/remove.

    python benchmarks/bench_runs.py [--numel 16777216] [--entries 1048576] [--repeats 3]

One ``nn.Linear`` weight of ``--numel`` entries (4096 x 4096 by default) is the whole model; a
skill covers ``--entries`` of them, either positions ``0..entries-1`` (a run, as a skill covering a
whole LayerNorm or a 100% tensor at an ``auto`` size has) or as many drawn at random. Prints the
median add and remove time of each and their ratio; the goal (issue 29) is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from skillbank import Region, Skill, SkillMetadata, Stitcher, base_fingerprint


def one_tensor_skill(model: nn.Module, positions: torch.Tensor, name: str) -> Skill:
    """A skill of ``model``'s single weight at ``positions`` (ascending), with random values."""
    state = {k: v for k, v in model.state_dict().items() if k == "weight"}
    values = torch.randn(positions.numel(), generator=torch.Generator().manual_seed(1)) * 1e-3
    metadata = SkillMetadata(
        name=name,
        base_fingerprint=base_fingerprint(state),
        sparsity=positions.numel() / state["weight"].numel(),
        shapes={"weight": list(state["weight"].shape)},
    )
    return Skill(metadata=metadata, regions={"weight": Region(positions, values)})


def timed_add_remove(model: nn.Module, skill: Skill, repeats: int) -> tuple[float, float]:
    """Median seconds of ``Stitcher.add`` and ``remove`` of ``skill`` on a fresh stitcher each time."""
    adds, removes = [], []
    for _ in range(repeats):
        stitcher = Stitcher(model, {"weight": model.weight.detach().clone()})
        start = time.perf_counter()
        stitcher.add(skill)
        adds.append(time.perf_counter() - start)
        start = time.perf_counter()
        stitcher.remove(skill.name)
        removes.append(time.perf_counter() - start)
    return statistics.median(adds), statistics.median(removes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=2**24, help="entries of the model's one weight (default: 2**24)")
    parser.add_argument("--entries", type=int, default=2**20, help="entries of the skill (default: 2**20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, the median kept (default: 3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    side = int(args.numel**0.5)
    model = nn.Linear(side, args.numel // side, bias=False).eval()
    run = torch.arange(args.entries)
    spread = torch.randperm(model.weight.numel(), generator=torch.Generator().manual_seed(0))[: args.entries].sort().values
    results = {}
    for label, positions in (("run", run), ("spread", spread)):
        results[label] = timed_add_remove(model, one_tensor_skill(model, positions, label), args.repeats)
        print(f"{label:<7} add {results[label][0]:.3f} s  remove {results[label][1]:.3f} s", flush=True)
    add_ratio, remove_ratio = (results["run"][i] / results["spread"][i] for i in (0, 1))
    print(f"run / spread: add {add_ratio:.2f}x, remove {remove_ratio:.2f}x (goal: at most 1.5x)")


if __name__ == "__main__":
    main()

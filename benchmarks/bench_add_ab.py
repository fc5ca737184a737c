"""Stitcher adds of one checkout of skillbank, for A/B runs against another (CPU, RoBERTa-base size).

    git worktree add /tmp/before <commit>
    python benchmarks/bench_add_ab.py /tmp/before 100
    python benchmarks/bench_add_ab.py . 100

Imports skillbank from REPO (checked), builds ``bench_stitch``'s RoBERTa-base-sized model
and its random 1% skills, adds N of them one at a time and prints one JSON line: the
median add (all, first 8, last 8), the union covered and the stitcher's state bytes.
Run each checkout in its own process, alone on the machine.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    repo, n = str(Path(sys.argv[1]).resolve()), int(sys.argv[2])
    sys.path[:0] = [repo, str(Path(__file__).resolve().parent)]
    import skillbank

    assert skillbank.__file__.startswith(repo), f"skillbank came from {skillbank.__file__}, not {repo}"
    from bench_stitch import make_base, random_skill, timed_adds
    from skillbank import Stitcher, base_fingerprint

    model = make_base("cpu")
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    params = sum(v.numel() for v in state.values())
    fingerprint = base_fingerprint(state)
    stitcher = Stitcher(model)
    times = timed_adds(stitcher, (random_skill(state, fingerprint, f"s{i}", seed=i) for i in range(n)), "cpu", params)
    print(
        json.dumps(
            {
                "repo": repo,
                "median_ms": statistics.median(times) * 1e3,
                "first8_ms": statistics.median(times[:8]) * 1e3,
                "last8_ms": statistics.median(times[-8:]) * 1e3,
                "total_s": sum(times),
                "slowest_ms": max(times) * 1e3,
                "covered": stitcher.covered / params,
                "state_bytes": stitcher.state_nbytes,
                "bytes_per_covered": stitcher.state_nbytes / stitcher.covered,
            }
        )
    )


if __name__ == "__main__":
    main()

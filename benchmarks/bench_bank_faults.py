"""SkillBank under abuse, full counts: SIGKILL trials and concurrent writers.

    python benchmarks/bench_bank_faults.py [--trials 200] [--seed 0] [--out faults.json]

Each trial starts a child that adds 6 skills (about 1.2 MB each) to one shared bank and
SIGKILLs it: half the trials at a random write, fsync or rename (a killed write is torn:
half its bytes land), half after a random delay. After each kill the bank must open,
verify, hold every acknowledged skill bit-identical, show no partial skill, and have no
temporary files left. Then 4 writers x 25 adds race into a fresh bank while a reader
reads every listed skill.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))
import bank_faults  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "bank"
        started = time.perf_counter()
        trials = []
        for t in range(args.trials):
            trials.append(bank_faults.crash_trial(bank, t, rng))
            if (t + 1) % 20 == 0:
                print(f"{t + 1} trials", file=sys.stderr)
        crash_s = time.perf_counter() - started
        concurrent = bank_faults.concurrent_writers(Path(tmp) / "concurrent" / "bank")
    failures = [t for t in trials if t["lost"] or t["damaged"] or t["wrong_bytes"] or t["leftovers"]]
    summary = {
        "trials": len(trials),
        "killed_by_sigkill": sum(t["killed"] for t in trials),
        "killed_mid_run": sum(t["killed"] and t["present"] < 6 for t in trials),
        "modes": Counter("timer" if t["mode"] == "timer" else "write/fsync/rename" for t in trials),
        "acknowledged": sum(t["acked"] for t in trials),
        "present_after_all": sum(t["present"] for t in trials),
        "failures": len(failures),
        "crash_seconds": round(crash_s, 1),
        "concurrent": {k: v for k, v in concurrent.items() if k != "reader_errors"}
        | {"reader_errors": len(concurrent["reader_errors"])},
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "trials": trials, "failures": failures}, indent=1))
    sys.exit(1 if failures or concurrent["reader_errors"] or concurrent["skills"] != 100 else 0)


if __name__ == "__main__":
    main()

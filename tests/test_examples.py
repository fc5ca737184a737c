"""Every runnable example, run as a user runs it, on the tiny models it makes itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


# each example with its arguments (the work folder comes last) and what it must print
RUNS = [
    ("quickstart.py", r"sentiment: finetuned [01]\.\d+, base \+ its [\d,]+-entry skill [01]\.\d+; removed again"),
    (
        "switching.py",
        r"topic: its own skill and head (0\.\d+)\ntopic, prepared: its own skill and head \1\n"
        r"routed to their own task's skill: [01]\.\d+ of 256",
    ),
    (
        "overlap_rules.py",
        r"sentiment-auto: sparsity [\d.e-]+ keeps [01]\.\d+ of the finetune, tried \d+ sizes\n"
        r"rule mean, both stitched: sentiment [01]\.\d+, topic [01]\.\d+ "
        r"\(topic's mask learned in the context of \['sentiment-auto'\]\)",
    ),
    (
        "learned_mask.py",
        r"topic-learned: [\d,]+ entries, base \+ skill [01]\.\d+, scored [\d,]+ of [\d,]+ entries\n"
        r"topic-pooled: [\d,]+ entries, base \+ skill [01]\.\d+, scored [\d,]+ of [\d,]+ entries",
    ),
    (
        "callbacks.py",
        r"banked 'topic-run': [\d,]+ entries.*\nserving \['sentiment-run', 'topic-run'\]: topic val_acc [01]\.\d+",
    ),
    (
        "continual.py --steps 150 --workdir",
        r"task 3 arrived: 'urgency', finetuned val acc [01]\.\d+, [\d,]+ entries banked\n"
        r"  after +sentiment +topic +urgency\n(  task \d( +[01]\.\d+| +-)+\n){3}",
    ),
    (
        "causal_lm.py",
        r"count: [\d,]+ entries \(next-token val_acc [01]\.\d+\); base \+ skill continues 7 8 9 with \[\d+, \d+, \d+, \d+\]",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, says", RUNS)
def test_the_example_runs_as_written(script, says, tmp_path):
    import re

    name, *options = script.split()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *options, str(tmp_path)], capture_output=True, text=True, cwd=EXAMPLES, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(says, done.stdout), done.stdout
    assert "Traceback" not in done.stderr


def test_every_example_is_run():
    """A new file in ``examples/`` needs its line in ``RUNS`` (``tiny_models.py`` is the examples' helper, not one)."""
    assert {script.split()[0] for script, _ in RUNS} == {p.name for p in EXAMPLES.glob("*.py")} - {"tiny_models.py"}

"""The continual picture: arrival metrics from a plain computation, and `skillbank plot arrivals`."""

from __future__ import annotations

import json

import pytest

from skillbank.comparison.arrivals import arrival_metrics
from skillbank.errors import SkillbankError
from skillbank.integrations.cli import main

ORDER = ["a", "b", "c"]
FINETUNED = {"a": 0.8, "b": 0.5, "c": 1.0}
ACCS = [{"a": 0.8}, {"a": 0.6, "b": 0.5}, {"a": 0.4, "b": 0.25, "c": 0.9}]


def test_average_and_backward_transfer_by_hand():
    m = arrival_metrics(ACCS, ORDER, FINETUNED)
    assert m["average"] == pytest.approx([1.0, (0.75 + 1.0) / 2, (0.5 + 0.5 + 0.9) / 3])
    # a lost 0.2/0.8 by arrival 2; by arrival 3 a lost 0.4/0.8 and b 0.25/0.5
    assert m["bwt"] == pytest.approx([0.0, -0.25, (-0.5 - 0.5) / 2])


@pytest.mark.parametrize(
    "accs, finetuned, words",
    [
        ([{"a": 0.8}, {"b": 0.5}], FINETUNED, "no accuracy for \\['a'\\]"),
        (ACCS, {**FINETUNED, "b": 0.0}, "positive finetuned accuracy"),
        (ACCS + [{}], FINETUNED, "only 3 tasks"),
    ],
)
def test_incomplete_runs_are_refused(accs, finetuned, words):
    with pytest.raises(SkillbankError, match=words):
        arrival_metrics(accs, ORDER, finetuned)


def test_skillbank_plot_arrivals_writes_a_png_and_prints_the_numbers(tmp_path, capsys):
    data = {
        "order": ORDER,
        "finetuned": FINETUNED,
        "methods": {"L&S": ACCS, "flat": [{"a": 0.8}, {"a": 0.8, "b": 0.5}, {"a": 0.8, "b": 0.5, "c": 1.0}]},
    }
    (tmp_path / "arrivals.json").write_text(json.dumps(data))
    assert main(["plot", "arrivals", str(tmp_path / "arrivals.json"), "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "flat: average 1.000 1.000 1.000; final backward transfer +0.000" in out
    assert "L&S: average 1.000 0.875 0.633; final backward transfer -0.500" in out
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text(json.dumps({"order": ORDER}))
    assert main(["plot", "arrivals", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.png")]) == 2
    assert "needs 'order', 'finetuned' and 'methods'" in capsys.readouterr().err

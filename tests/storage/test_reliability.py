"""Reliability under abuse: SIGKILL mid-write, concurrent writers and readers, corruption, faults, no pickle."""

from __future__ import annotations

import copy
import pickle
import random
import re
from pathlib import Path

import bank_faults
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.models import finetune_like, live_copy, make_skill, reference_stitch
from skillbank import BankError, SkillBank, SkillFileError, Stitcher, localize_dataless, task_vector


def test_sigkill_during_adds_never_loses_or_damages_acknowledged_skills(tmp_path):
    rng = random.Random(1)
    bank = tmp_path / "bank"
    results = [bank_faults.crash_trial(bank, trial, rng) for trial in range(8)]
    for r in results:
        assert r["lost"] == [] and r["damaged"] == [] and r["wrong_bytes"] == [] and r["leftovers"] == [], r
        assert r["acked"] <= r["present"]
    assert any(r["mode"] == "timer" for r in results) and any(r["mode"] != "timer" for r in results)
    assert any(r["killed"] and r["present"] < 6 for r in results)  # some kills really landed mid-run


def test_four_concurrent_writers_and_a_reader(tmp_path):
    result = bank_faults.concurrent_writers(tmp_path / "bank", writers=4, each=25)
    assert result["exit_codes"] == [0, 0, 0, 0]
    assert result["skills"] == 100 and result["verified"] == 100
    assert result["reader_errors"] == [] and result["reader_reads"] > 0


@pytest.fixture(scope="module")
def damaged_bank_source(tmp_path_factory):
    torch.manual_seed(0)
    from transformers import BertModel

    from helpers.models import tiny_config

    base = BertModel(tiny_config()).eval()
    path = tmp_path_factory.mktemp("src") / "bank"
    bank = SkillBank(path)
    for i in range(3):
        bank.add(make_skill(base, f"t{i}", seed=i))
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, 2), where=st.floats(0, 1, exclude_max=True), mode=st.sampled_from(["flip", "truncate"]))
def test_any_flipped_byte_or_truncation_in_a_skill_file_is_detected(damaged_bank_source, tmp_path_factory, which, where, mode):
    path = _copy(damaged_bank_source, tmp_path_factory.mktemp("c") / "bank")
    victim = path / f"t{which}.safetensors"
    data = bytearray(victim.read_bytes())
    at = int(where * len(data))
    if mode == "flip":
        data[at] ^= 1 << (at % 8)
    else:
        del data[at:]
    victim.write_bytes(bytes(data))
    bank = SkillBank(path)
    with pytest.raises(SkillFileError, match=re.escape(str(victim)) + ".*(sha256|truncated)"):
        bank.get(f"t{which}")
    report = bank.verify()
    assert [n for n, s in report.items() if s != "ok"] == [f"t{which}"]
    for other in {"t0", "t1", "t2"} - {f"t{which}"}:
        assert bank.get(other).name == other


def test_every_single_byte_flip_of_the_manifest_is_detected(damaged_bank_source, tmp_path):
    path = _copy(damaged_bank_source, tmp_path / "bank")
    manifest = path / "manifest.json"
    good = manifest.read_bytes()
    for at in range(len(good)):
        for bit in (0, 3):
            data = bytearray(good)
            data[at] ^= 1 << bit
            manifest.write_bytes(bytes(data))
            with pytest.raises(BankError, match="manifest.json.*(damaged|newer)"):
                SkillBank(path)
    for cut in range(0, len(good), 37):
        manifest.write_bytes(good[:cut])
        with pytest.raises(BankError, match="manifest.json"):
            SkillBank(path)


def interrupted_midway(model, monkeypatch, step) -> None:  # noqa: ANN001
    """Run ``step`` with a Ctrl-C raised at its write into a mid-model tensor; the model must be exactly as before."""
    before = copy.deepcopy(model.state_dict())
    victim = model.bert.encoder.layer[1].output.dense.weight.data_ptr()
    original = torch.Tensor.index_copy_

    def failing(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.data_ptr() == victim:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_copy_", failing)
    with pytest.raises(KeyboardInterrupt):
        step()
    monkeypatch.setattr(torch.Tensor, "index_copy_", original)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_stitcher_interrupted_mid_write_leaves_the_model_as_before(base_model, monkeypatch):
    skills = [make_skill(base_model, f"t{i}", seed=i, sparsity=0.1) for i in range(3)]
    model = live_copy(base_model)
    stitcher = Stitcher(model)
    stitcher.add(skills[0])
    interrupted_midway(model, monkeypatch, lambda: stitcher.add(skills[1]))
    assert stitcher.stitched == ["t0"]
    stitcher.add(skills[1])  # the stitcher's state was not touched either: the math still holds
    stitcher.add(skills[2])
    base_state = {k: v for k, v in base_model.state_dict().items() if v.is_floating_point()}
    expected = reference_stitch(base_state, skills)
    for name, value in model.bert.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    for name in list(stitcher.stitched):
        stitcher.remove(name)
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, base_model.state_dict()[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stitcher_interrupted_mid_remove_leaves_the_model_as_before(base_model, monkeypatch, dtype):
    # A remove reads nothing from the model: its way back is computed from the stitcher's rows, bit for bit.
    base = copy.deepcopy(base_model).to(dtype)
    skills = [
        localize_dataless(task_vector(base, finetune_like(base_model, seed=i).to(dtype)), 0.1, name=f"t{i}") for i in range(3)
    ]
    model = live_copy(base_model).to(dtype)
    stitcher = Stitcher(model)
    for skill in skills:
        stitcher.add(skill)
    stitcher.remove("t2")  # some entries now uncovered, holding their base again
    interrupted_midway(model, monkeypatch, lambda: stitcher.remove("t0"))
    assert stitcher.stitched == ["t0", "t1"]
    stitcher.switch([])
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, base.state_dict()[name]), name


def test_no_pickle_anywhere(base_model, tmp_path, monkeypatch):
    package = Path(__file__).resolve().parents[2] / "skillbank"
    for source in package.rglob("*.py"):
        text = source.read_text()
        # nothing that unpickles is called (catching pickle.UnpicklingError, to report a checkpoint torch refused, is not)
        assert not re.search(r"\bpickle\.(loads?|Unpickler)\b|\bfrom _?c?pickle import\b|torch\.load\b|weights_only", text), (
            source
        )

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "t", seed=1))
    assert SkillBank(tmp_path / "bank").get("t").name == "t" and bank.verify() == {"t": "ok"}
    assert {p.suffix for p in (tmp_path / "bank").iterdir() if not p.name.startswith(".")} == {".json", ".safetensors"}

"""SkillBank: registry operations, durability rules and bad input."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import BertModel

from helpers.models import make_skill, tiny_config
from skillbank import BankError, BaseMismatchError, SkillBank, SkillFileError, SkillNameError


def test_add_get_list_remove_verify(tmp_path, base_model):
    bank = SkillBank(tmp_path / "bank")
    skills = [make_skill(base_model, f"t{i}", seed=i) for i in range(3)]
    entries = [bank.add(s) for s in skills]
    assert bank.names() == ["t0", "t1", "t2"] and len(bank) == 3 and "t1" in bank
    assert entries[0].entries == skills[0].num_entries and entries[0].sha256
    reopened = SkillBank(tmp_path / "bank", create=False)
    got = reopened.get("t1")
    for name, region in skills[1].regions.items():
        assert torch.equal(got.regions[name].indices, region.indices)
    assert reopened.verify() == {"t0": "ok", "t1": "ok", "t2": "ok"}
    reopened.remove("t1")
    assert bank.names() == ["t0", "t2"]
    assert not (tmp_path / "bank" / "t1.safetensors").exists()
    assert bank.base_fingerprint == skills[0].metadata.base_fingerprint
    assert [e.name for e in bank.entries()] == ["t0", "t2"] == [e.name for e in bank]


def test_duplicate_and_unknown_names(tmp_path, base_model):
    bank = SkillBank(tmp_path)
    bank.add(make_skill(base_model, "t", seed=1))
    with pytest.raises(SkillNameError, match="already in"):
        bank.add(make_skill(base_model, "t", seed=2))
    with pytest.raises(SkillNameError, match=r"no skill named 'nope'.*\['t'\]"):
        bank.get("nope")
    with pytest.raises(SkillNameError, match="no skill named"):
        bank.remove("nope")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "has space", "x" * 200])
def test_unsafe_names_are_refused(tmp_path, base_model, name):
    with pytest.raises(SkillNameError, match="invalid skill name"):
        SkillBank(tmp_path).add(make_skill(base_model, name, seed=1))
    assert not any(p.suffix == ".safetensors" for p in tmp_path.rglob("*"))


def test_skill_from_another_base_is_refused(tmp_path, base_model):
    bank = SkillBank(tmp_path)
    bank.add(make_skill(base_model, "t", seed=1))
    torch.manual_seed(99)
    other = BertModel(tiny_config()).eval()
    with pytest.raises(BaseMismatchError, match="another base"):
        bank.add(make_skill(other, "alien", seed=1))
    assert bank.names() == ["t"]


def test_nan_and_empty_skills_are_refused(tmp_path, base_model):
    skill = make_skill(base_model, "t", seed=1)
    name = next(n for n, r in skill.regions.items() if len(r))
    skill.regions[name].values[0] = float("nan")
    with pytest.raises(SkillFileError, match="NaN"):
        SkillBank(tmp_path).add(skill)
    empty = make_skill(base_model, "e", seed=1)
    for region in empty.regions.values():
        region.indices, region.values = region.indices[:0], region.values[:0]
    with pytest.raises(SkillFileError, match="empty mask"):
        SkillBank(tmp_path).add(empty)


def test_bank_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(BankError, match="is a file"):
        SkillBank(path)


def test_non_bank_directory_is_not_clobbered(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="not a skill bank"):
        SkillBank(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_bank_without_create(tmp_path):
    with pytest.raises(BankError, match="no skill bank"):
        SkillBank(tmp_path / "none", create=False)


def test_read_only_bank_reads_but_refuses_writes(tmp_path, base_model):
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "t", seed=1))
    mode = (tmp_path / "bank").stat().st_mode
    os.chmod(tmp_path / "bank", stat.S_IREAD | stat.S_IEXEC)
    try:
        ro = SkillBank(tmp_path / "bank")
        assert ro.get("t").name == "t" and ro.verify() == {"t": "ok"}
        with pytest.raises(BankError, match="read-only"):
            ro.add(make_skill(base_model, "u", seed=2))
        with pytest.raises(BankError, match="read-only"):
            ro.remove("t")
        assert ro.names() == ["t"]
    finally:
        os.chmod(tmp_path / "bank", mode)


def test_corrupted_and_truncated_skill_files_are_named(tmp_path, base_model):
    bank = SkillBank(tmp_path)
    for i in range(3):
        bank.add(make_skill(base_model, f"t{i}", seed=i))
    data = bytearray((tmp_path / "t1.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "t1.safetensors").write_bytes(bytes(data))
    raw = (tmp_path / "t2.safetensors").read_bytes()
    (tmp_path / "t2.safetensors").write_bytes(raw[:-10])
    with pytest.raises(SkillFileError, match="t1.*sha256"):
        bank.get("t1")
    with pytest.raises(SkillFileError, match="t2.*truncated"):
        bank.get("t2")
    report = bank.verify()
    assert report["t0"] == "ok" and "sha256" in report["t1"] and "truncated" in report["t2"]
    assert bank.get("t0").name == "t0"


def test_damaged_or_newer_manifest_is_refused(tmp_path, base_model):
    bank = SkillBank(tmp_path)
    bank.add(make_skill(base_model, "t", seed=1))
    manifest = tmp_path / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(good.replace(b'"t"', b'"u"', 1))
    with pytest.raises(BankError, match="checksum"):
        SkillBank(tmp_path)
    manifest.write_bytes(good[:-20])
    with pytest.raises(BankError, match="not valid JSON"):
        SkillBank(tmp_path)
    body = json.loads(good)
    body["format_version"] = 7
    manifest.write_text(json.dumps(body))
    with pytest.raises(BankError, match="newer.*upgrade"):
        SkillBank(tmp_path)


def test_leftover_temporary_files_are_cleaned_by_the_next_write_not_by_a_read(tmp_path, base_model):
    bank = SkillBank(tmp_path)
    bank.add(make_skill(base_model, "t", seed=1))
    leftover = tmp_path / f".tmp-{'deadbeef' * 4}-x.safetensors"  # as atomic_write names them
    leftover.write_bytes(b"half a skill")
    assert SkillBank(tmp_path).verify() == {"t": "ok"} and leftover.exists()  # reads never write
    assert SkillBank(tmp_path).orphans() == [leftover.name]
    bank.add(make_skill(base_model, "u", seed=2))
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_lock_held_too_long_is_a_timeout_error(tmp_path):
    import fcntl
    import os

    from skillbank.errors import BankLockedError
    from skillbank.storage.durable import exclusive_lock

    lock = tmp_path / ".lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file holds it: as another process would
    try:
        with pytest.raises(TimeoutError, match="held the write lock") as caught, exclusive_lock(lock, timeout=0.05):
            pass
        assert isinstance(caught.value, BankLockedError)  # and a SkillbankError, like every other
    finally:
        os.close(holder)


def test_tags_and_a_note_label_a_skill_in_the_manifest_without_touching_its_file(tmp_path, base_model):
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "a", seed=1), tags=["prod", "v1"], note="first try")
    bank.add(make_skill(base_model, "b", seed=2))
    file_before = (bank.path / "a.safetensors").read_bytes()
    assert bank.entry("a").tags == ["prod", "v1"] and bank.entry("a").note == "first try" and bank.entry("b").tags == []
    entry = bank.annotate("a", add_tags=["v2", "prod", "v2"], remove_tags=["v1"], note="second")
    assert entry.tags == ["prod", "v2"] and entry.note == "second"
    again = SkillBank(tmp_path / "bank")  # what a reader sees after the rewrite
    assert again.entry("a").tags == ["prod", "v2"] and again.entry("a").note == "second"
    assert again.annotate("a", remove_tags=["absent"]).tags == ["prod", "v2"]  # removing a tag not there is no error
    assert (bank.path / "a.safetensors").read_bytes() == file_before and again.verify() == {"a": "ok", "b": "ok"}
    with pytest.raises(SkillNameError, match="invalid tags"):
        bank.annotate("a", add_tags=["has space"])
    with pytest.raises(SkillNameError, match="tags must be a list"):
        bank.add(make_skill(base_model, "c", seed=3), tags="prod")
    with pytest.raises(SkillNameError, match="no skill named 'zz'"):
        bank.annotate("zz", add_tags=["x"])
    assert bank.names() == ["a", "b"] and SkillBank(tmp_path / "bank").entry("a").tags == ["prod", "v2"]


def test_replace_swaps_a_skill_atomically_and_keeps_the_old_provenance(tmp_path, base_model, monkeypatch):
    bank = SkillBank(tmp_path / "bank")
    v1 = make_skill(base_model, "a", seed=1)
    v1.metadata.source["run"] = 1
    bank.add(v1, tags=["prod"], note="v1")
    bank.add(make_skill(base_model, "b", seed=2))
    old = bank.entry("a")
    v2 = make_skill(base_model, "a", seed=3)
    entry = bank.replace(v2)
    assert "replaces" not in v2.metadata.source  # the caller's skill is not changed
    assert entry.file == f"a.{entry.sha256[:12]}.safetensors" and entry.tags == ["prod"] and entry.note == "v1"
    got = SkillBank(tmp_path / "bank").get("a")
    assert all(torch.equal(got.regions[n].indices, r.indices) for n, r in v2.regions.items())
    assert got.metadata.source["versions"] == 1
    (replaced,) = got.metadata.source["replaces"]
    assert replaced["sha256"] == old.sha256 and replaced["created"] == old.created and replaced["source"]["run"] == 1
    assert bank.names() == ["a", "b"] and bank.verify() == {"a": "ok", "b": "ok"}
    assert sorted(p.name for p in bank.path.iterdir() if not p.name.startswith(".")) == sorted(
        [entry.file, "b.safetensors", "manifest.json"]
    )

    v3 = make_skill(base_model, "a", seed=4)
    third = bank.replace(v3, tags=["beta"])
    chain = bank.get("a").metadata.source["replaces"]  # flat, newest first
    assert third.tags == ["beta"] and [v["sha256"] for v in chain] == [entry.sha256, old.sha256]
    assert chain[1]["source"]["run"] == 1 and "replaces" not in (chain[0]["source"] or {})
    assert not (bank.path / entry.file).exists()

    # a failed switch leaves the old skill in place and no new file behind
    def full_disk(body):  # noqa: ANN001, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SkillBank, "_write_manifest", lambda self, body: full_disk(body))
    with pytest.raises(BankError, match="no space left to replace 'a'.*the bank is unchanged"):
        bank.replace(make_skill(base_model, "a", seed=5))
    monkeypatch.undo()
    assert bank.entry("a") == third and bank.verify() == {"a": "ok", "b": "ok"}
    assert sorted(p.name for p in bank.path.iterdir() if p.name.endswith(".safetensors")) == sorted([third.file, "b.safetensors"])

    (bank.path / third.file).write_bytes(b"damaged")  # a damaged version can be replaced; its manifest line is kept
    fourth = bank.replace(make_skill(base_model, "a", seed=6))
    kept = bank.get("a").metadata.source["replaces"][0]
    assert kept["sha256"] == third.sha256 and kept["source"] is None and "truncated or damaged" in kept["unreadable"]
    third = fourth
    bank.remove("a")  # removes the versioned file
    assert bank.names() == ["b"] and not (bank.path / third.file).exists()
    with pytest.raises(SkillNameError, match="no skill named 'a' .* to replace; add it instead"):
        bank.replace(v1)
    other = make_skill(BertModel(tiny_config()), "b", seed=1)
    with pytest.raises(BaseMismatchError, match="another base model"):
        bank.replace(other)


def test_replacing_a_skill_with_an_older_nested_chain_flattens_it(tmp_path, base_model):
    old = make_skill(base_model, "a", seed=1)
    nested: dict = {"run": 0}
    for i in range(1, 21):  # what earlier releases wrote: each version's source nests the one before
        nested = {"run": i, "replaces": {"sha256": f"{i:064x}", "source": nested}}
    old.metadata.source.update(nested)
    bank = SkillBank(tmp_path / "bank")
    bank.add(old)
    bank.replace(make_skill(base_model, "a", seed=2))
    source = bank.get("a").metadata.source
    chain = source["replaces"]
    assert source["versions"] == 21 and len(chain) == 16  # the old version and the 20 it nested, 16 kept
    assert chain[0]["source"]["run"] == 20 and [v["sha256"] for v in chain[1:3]] == [f"{20:064x}", f"{19:064x}"]
    assert all("replaces" not in (v["source"] or {}) for v in chain)


def test_whether_a_skill_routes_is_told_from_its_header_alone(tmp_path, base_model, monkeypatch):
    from skillbank.stitching.routing import with_routing

    bank = SkillBank(tmp_path / "bank")
    bank.add(with_routing(make_skill(base_model, "routed", seed=1), torch.randn(2, 32)))
    bank.add(make_skill(base_model, "plain", seed=2))
    import skillbank.storage.bank as bank_module

    real_read = bank_module._read_regular

    def manifest_only(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        assert path.suffix != ".safetensors", f"{path} was read whole"
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(bank_module, "_read_regular", manifest_only)
    assert bank.routable("routed") and not bank.routable("plain")
    with pytest.raises(AssertionError, match="was read whole"):
        bank.get("plain")  # what routable does not do
    with pytest.raises(SkillNameError, match="no skill named 'gone'"):
        bank.routable("gone")

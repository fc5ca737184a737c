"""A bank crafted by someone else: manifests and files that try to reach outside the bank, hang it or crash it.

A manifest's checksum is recomputable by anyone, so each case here rewrites the
manifest with a valid checksum: only validation of what it says stops it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers.banks import craft
from helpers.models import make_skill
from skillbank import BankError, Skill, SkillBank, SkillbankError, SkillFileError
from skillbank.integrations.cli import main

# -- hostile manifests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["../victim.txt", "/ABS/victim.txt", "manifest.json", "b.safetensors"])
def test_a_manifest_entry_pointing_elsewhere_is_refused_and_nothing_is_deleted(bank, tmp_path, file, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    craft(bank.path, lambda body: body["skills"][0].update(file=file.replace("/ABS", str(tmp_path))))
    assert main(["remove", str(bank.path), "a"]) == 2
    err = capsys.readouterr().err
    assert "is crafted or damaged: entry 1 (a): its file must be a.safetensors" in err and "Nothing was read or changed" in err
    assert victim.read_text() == "keep me" and (bank.path / "manifest.json").is_file() and (bank.path / "b.safetensors").is_file()


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            lambda body: body["skills"][0].update(name="../../victim_model/model", file="../../victim_model/model.safetensors"),
            "is not a valid skill name",
        ),
        (lambda body: body["skills"].append(dict(body["skills"][0])), "the name 'a' appears twice"),
        (lambda body: body.update(skills={"a": 1}), "'skills' is not a list"),
        (lambda body: body["skills"][0].pop("sha256"), "entry 1 has no 'sha256'"),
        (lambda body: body["skills"][0].update(bytes="12"), "'bytes' is not a int"),
        (lambda body: body["skills"][0].update(metrics={"acc": "high"}), "'metrics' must map"),
        (lambda body: body["skills"][0].update(task="x" * 5000), "'task' is longer than 4096"),
        (lambda body: body["skills"][0].update(tags="prod"), "'tags' has the wrong type"),
        (lambda body: body["skills"][0].update(tags=["\x1b[31mred"]), "'tags' must be at most 32 tags"),
        (lambda body: body["skills"][0].update(tags=[f"t{i}" for i in range(33)]), "'tags' must be at most 32 tags"),
        (lambda body: body["skills"][0].update(note=["x"]), "'note' has the wrong type"),
        (lambda body: body["skills"][0].update(note="x" * 5000), "'note' is longer than 4096"),
    ],
)
def test_malformed_manifest_entries_are_named(bank, edit, problem):
    craft(bank.path, edit)
    with pytest.raises(BankError, match=problem):
        SkillBank(bank.path).names()


def test_a_deeply_nested_manifest_is_a_clear_error(bank):
    (bank.path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BankError, match="not valid JSON"):
        SkillBank(bank.path)


def test_a_symlinked_lock_is_refused_and_nothing_is_created_outside(bank, tmp_path, capsys):
    outside = tmp_path / "outside-file"
    (bank.path / ".lock").unlink(missing_ok=True)
    (bank.path / ".lock").symlink_to(outside)
    assert main(["list", str(bank.path)]) == 0  # reading works
    assert not outside.exists()
    with pytest.raises(BankError, match=r"\.lock is a symbolic link"):
        SkillBank(bank.path).remove("a")
    assert not outside.exists() and SkillBank(bank.path).names() == ["a", "b"]


def test_a_tmp_named_directory_is_left_alone_and_the_bank_works(bank):
    (bank.path / ".tmp-x").mkdir()
    (bank.path / ".tmp-x" / "inside").write_text("mine")
    SkillBank(bank.path).remove("a")
    assert (bank.path / ".tmp-x" / "inside").read_text() == "mine" and SkillBank(bank.path).names() == ["b"]


def test_a_users_own_tmp_file_is_neither_adopted_nor_deleted(tmp_path, base_model):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / ".tmp-notes.txt").write_text("my notes")
    with pytest.raises(BankError, match="not empty and holds no manifest.json"):
        SkillBank(folder)
    assert (folder / ".tmp-notes.txt").read_text() == "my notes"


def test_only_the_banks_own_temporary_files_are_cleaned_up(bank):
    own = bank.path / (".tmp-" + "0" * 32 + "-a.safetensors")
    own.write_bytes(b"partial")
    other = bank.path / ".tmp-keep.txt"
    other.write_text("someone's")
    assert SkillBank(bank.path).gc() == [own.name]
    assert not own.exists() and other.read_text() == "someone's"


# -- hostile skill files -------------------------------------------------------------------------------------


def _replace_file(bank: SkillBank, name: str, make) -> None:  # noqa: ANN001
    path = bank.path / f"{name}.safetensors"
    size = path.stat().st_size
    path.unlink()
    make(path, size)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path, size: path.symlink_to("/dev/zero"), "is a symbolic link"),
        (lambda path, size: os.mkfifo(path), "not a regular file"),
        (lambda path, size: path.mkdir(), "not a regular file"),
    ],
)
def test_a_skill_file_that_is_a_link_fifo_or_huge_is_refused_without_reading(bank, make, problem):
    _replace_file(bank, "a", make)
    with pytest.raises(SkillFileError, match=problem):
        bank.get("a")
    with pytest.raises(SkillFileError, match=problem):
        bank.routable("a")  # the header alone is read as carefully
    report = bank.verify()
    assert report["b"] == "ok" and report["a"] != "ok"  # every skill checked, the damaged one reported


def test_a_huge_sparse_skill_file_with_a_matching_entry_is_refused_before_reading(bank):
    huge = 50 * 2**30
    _replace_file(bank, "a", lambda path, size: (path.touch(), os.truncate(path, huge)))
    craft(bank.path, lambda body: body["skills"][0].update(bytes=huge))
    with pytest.raises(BankError, match=r"entry 1 \(a\): a size outside 0-17,179,869,184 bytes"):
        SkillBank(bank.path).get("a")


def test_a_declared_10_gib_skill_file_is_refused_from_its_header_without_reading_it(bank, monkeypatch):
    size = 10 * 2**30
    _replace_file(bank, "a", lambda path, _: (path.write_bytes(b"\x10" + b"\0" * 7 + b'{"x":1}   '), os.truncate(path, size)))
    craft(bank.path, lambda body: body["skills"][0].update(bytes=size))
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(SkillFileError, match="not a safetensors file"):
        SkillBank(bank.path).get("a")
    assert sum(reads) < 2**20  # a few bytes of header, not 10 GiB
    report = SkillBank(bank.path).verify()
    assert report["b"] == "ok" and "not a safetensors file" in report["a"]


def test_removing_a_skill_whose_file_is_a_link_leaves_the_target(bank, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"data")
    _replace_file(bank, "a", lambda path, size: path.symlink_to(victim))
    bank.remove("a")
    assert victim.read_bytes() == b"data" and bank.names() == ["b"]


def _tampered(skill, edit_tensors=None, edit_header=None) -> bytes:  # noqa: ANN001
    """``skill``'s bytes with its tensors or its header (a dict) changed, as a crafted file would be."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(skill.to_bytes())
    header = json.loads(skill.metadata.to_json())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    return st_save(tensors, metadata={"skillbank": json.dumps(header)})


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in tensors if k.endswith(suffix))


@pytest.mark.parametrize(
    "tensors, header, problem",
    [
        (lambda t: t.update({"head/classifier.bias": torch.tensor([float("nan"), 0.0])}), None, "head tensor .* NaN"),
        (lambda t: t.update({_first(t, "/val"): t[_first(t, "/val")].to(torch.int32)}), None, "stores torch.int32 values"),
        (lambda t: t.update({_first(t, "/val"): t[_first(t, "/val")] > 0}), None, "stores torch.bool values"),
        (lambda t: t.update({_first(t, "/idx"): t[_first(t, "/idx")].float()}), None, "not an integer type"),
        (
            lambda t: t.update({_first(t, "/idx"): torch.cat([torch.tensor([-1]), t[_first(t, "/idx")][1:].long()])}),
            None,
            "strictly ascending inside",
        ),
        (None, lambda h: h.update(shapes=[["a", [3]]]), "'shapes' must map"),
        (None, lambda h: h.update(shapes="embeddings"), "'shapes' must map"),
        (None, lambda h: h["shapes"].update(big=[4_000_000_000, 2**20]), "the shape of 'big'"),
        (None, lambda h: h.update(task=7), "'task' must be a string"),
        (None, lambda h: h.update(sparsity="1%"), "'sparsity' must be a number"),
        (None, lambda h: h.update(settings=[1]), "'settings' must be an object"),
    ],
)
def test_crafted_skill_contents_are_refused_naming_the_file_and_field(base_model, tensors, header, problem):
    data = _tampered(make_skill(base_model, "a", seed=1), tensors, header)
    with pytest.raises(SkillFileError, match=problem) as info:
        Skill.from_bytes(data, origin="crafted.safetensors")
    assert "crafted" in str(info.value)


def test_a_deeply_nested_skill_header_is_a_clear_error(base_model):
    from safetensors.torch import save as st_save

    data = st_save({"head/x": torch.zeros(1)}, metadata={"skillbank": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(SkillFileError, match="unreadable skill header|not a readable"):
        Skill.from_bytes(data, origin="deep.safetensors")


# -- outputs -------------------------------------------------------------------------------------------------


def test_escapes_in_skill_fields_reach_neither_the_terminal_nor_the_model_card(tmp_path, base_model, capsys):
    from helpers.models import finetune_like
    from skillbank import localize_dataless, task_vector

    base_model.save_pretrained(tmp_path / "base")
    hostile = "\x1b]0;owned\x07\x1b[2J| fake | row |\n<img src=x onerror=alert(1)>"
    skill = localize_dataless(
        task_vector(base_model, finetune_like(base_model, seed=1)),
        0.05,
        name="a",
        task=hostile,
        source={"kind": "full finetune\x1b[31m", "finetuned": "<b>x</b>"},
    )
    SkillBank(tmp_path / "bank").add(skill)
    for command in (["list", str(tmp_path / "bank")], ["show", str(tmp_path / "bank"), "a"]):
        assert main(command) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    assert (
        main(["stitch", "--base", str(tmp_path / "base"), "--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "out")]) == 0
    )
    card = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| a |"))
    assert "\x1b" not in card and "<img" not in card and "&lt;img" in card
    assert row.count(" | ") == 5 and "\\| fake \\| row \\|" in row  # the injected cells stay inside one cell


# -- resources -----------------------------------------------------------------------------------------------


def test_a_skill_that_overflows_a_half_precision_model_is_refused_and_the_model_unchanged(base_model):
    import copy
    from dataclasses import replace

    from helpers.models import finetune_like, live_copy
    from skillbank import Region, Stitcher, StitchError, localize_dataless, task_vector

    base16 = copy.deepcopy(base_model).half()

    def skill16(name: str, seed: int):  # noqa: ANN202
        return localize_dataless(task_vector(base16, finetune_like(base_model, seed=seed).half()), 0.05, name=name)

    big = skill16("big", 1)  # finite values, but 1e5 overflows float16 (max 65504) once added to the base
    big = replace(big, regions={n: Region(r.indices, torch.full_like(r.values, 1e5)) for n, r in big.regions.items()})
    live = live_copy(base_model).half()
    before = {k: v.clone() for k, v in live.state_dict().items()}
    stitcher = Stitcher(live)
    with pytest.raises(StitchError, match=r"overflow torch.float16 .*the model is unchanged. Load the model in a wider dtype"):
        stitcher.add(big)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items()) and stitcher.stitched == []
    stitcher.add(skill16("fine", 2))  # the stitcher still works
    assert stitcher.stitched == ["fine"]


def _stitch_args(tmp_path, out: str) -> list[str]:  # noqa: ANN001
    return ["stitch", "--base", str(tmp_path / "base"), "--bank", str(tmp_path / "bank"), "--out", str(tmp_path / out)]


@pytest.fixture
def stitchable(tmp_path, base_model):  # noqa: ANN001, ANN201
    base_model.save_pretrained(tmp_path / "base")
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "a", seed=1))
    bank.add(make_skill(base_model, "b", seed=2))
    return tmp_path


def test_a_failed_stitch_leaves_no_output_folder_and_no_partial_one(stitchable, monkeypatch, capsys):
    from skillbank.stitching import stitch_out

    def disk_full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stitch_out, "save_file", disk_full)
    monkeypatch.setattr(stitch_out.Path, "write_text", disk_full)
    assert main(_stitch_args(stitchable, "out")) == 2  # one line, not a traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert sorted(p.name for p in stitchable.iterdir()) == ["bank", "base"]  # neither out nor .out.partial-…


def test_two_stitches_into_one_folder_never_mix(stitchable, monkeypatch, capsys):
    from skillbank.stitching import stitch_out

    out = stitchable / "out"
    card = stitch_out._model_card

    def other_run_finishes_while_this_one_writes(*args):  # noqa: ANN002, ANN202
        (out / "heads").mkdir(parents=True)
        (out / "heads" / "theirs.safetensors").write_bytes(b"x")
        return card(*args)

    monkeypatch.setattr(stitch_out, "_model_card", other_run_finishes_while_this_one_writes)
    with pytest.raises(SkillbankError, match="was filled by another run while this one worked; nothing of this run was kept"):
        stitch_out.stitch_to_folder(stitchable / "base", SkillBank(stitchable / "bank"), ["a", "b"], out)
    assert sorted(p.name for p in out.rglob("*")) == ["heads", "theirs.safetensors"]
    assert not list(stitchable.glob(".out.partial-*"))


def test_a_killed_stitch_never_leaves_a_folder_that_loads_as_complete(stitchable, capsys):
    (stitchable / ".out.partial-0123").mkdir()  # what a SIGKILL mid-write leaves: a hidden sibling, not out
    (stitchable / ".out.partial-0123" / "config.json").write_text("{}")
    assert not (stitchable / "out").exists()
    assert main(_stitch_args(stitchable, "out")) == 0  # a re-run is not refused
    assert {"config.json", "model.safetensors", "README.md", "heads"} <= {p.name for p in (stitchable / "out").iterdir()}
    assert (
        main(["export", str(stitchable / "bank"), "a", "--base", str(stitchable / "base"), "--out", str(stitchable / "one")]) == 0
    )
    assert (stitchable / "one" / "README.md").is_file() and not list(stitchable.glob(".one.partial-*"))


# -- no pickle -----------------------------------------------------------------------------------------------


def test_a_folder_with_only_pickled_weights_is_refused_before_anything_is_deserialized(stitchable, monkeypatch, capsys):
    import torch as torch_module

    pickled = stitchable / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((stitchable / "base" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch_module, "load", never)
    for command in (
        ["stitch", "--base", str(pickled), "--bank", str(stitchable / "bank"), "--out", str(stitchable / "o")],
        ["export", str(stitchable / "bank"), "a", "--base", str(pickled), "--out", str(stitchable / "o")],
    ):
        assert main(command) == 2
        assert "holds only pickled weights (pytorch_model.bin), and skillbank never unpickles" in capsys.readouterr().err
    adapter = stitchable / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "SEQ_CLS"}')
    (adapter / "adapter_model.bin").write_bytes(b"x")
    assert (
        main(
            [
                "localize",
                "--base",
                str(stitchable / "base"),
                "--finetuned",
                str(adapter),
                "--bank",
                str(stitchable / "bank"),
                "--name",
                "c",
            ]
        )
        == 2
    )
    assert "no adapter_model.safetensors: it holds only pickled weights (adapter_model.bin)" in capsys.readouterr().err


# -- a live stitcher can always undo ---------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["removed", "replaced", "deleted file"])
def test_a_skill_whose_bank_copy_changed_is_refused_clearly_and_reset_restores_the_base(bank, base_model, what):
    from helpers.models import live_copy
    from skillbank import Stitcher, StitchError

    live = live_copy(base_model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    stitcher = Stitcher(live, bank=bank)
    stitcher.add("a")
    stitcher.add("b")
    if what == "removed":
        bank.remove("a")
    elif what == "replaced":
        bank.remove("a")
        bank.add(make_skill(base_model, "a", seed=9))
    else:
        (bank.path / "a.safetensors").unlink()
    with pytest.raises(StitchError, match=r"skill 'a' .*cannot subtract it exactly; stitcher.reset\(\) puts the base back"):
        stitcher.remove("a")
    assert stitcher.stitched == ["a", "b"]
    stitcher.reset()
    assert stitcher.stitched == [] and all(torch.equal(before[k], v) for k, v in live.state_dict().items())
    stitcher.add("b")  # and it stitches again
    assert stitcher.stitched == ["b"]


def test_a_full_disk_while_adding_is_a_clear_error_and_leaves_no_orphan(bank, base_model, monkeypatch):
    import errno

    from skillbank.storage import bank as bank_module

    real = bank_module.atomic_write

    def full_for_the_manifest(path, data):  # noqa: ANN001, ANN202 - room for the skill file, not for the manifest
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(bank_module, "atomic_write", full_for_the_manifest)
    with pytest.raises(BankError, match="no space left to add 'c'.*the bank is unchanged. Free space"):
        bank.add(make_skill(base_model, "c", seed=3))
    monkeypatch.undo()
    assert not (bank.path / "c.safetensors").exists() and bank.names() == ["a", "b"]
    assert bank.verify() == {"a": "ok", "b": "ok"}


def test_remove_works_on_a_full_disk(bank, monkeypatch):
    import errno

    from skillbank.storage import bank as bank_module

    real_write, real_unlink, freed = bank_module.atomic_write, bank_module._unlink_regular, []

    def full_until_a_file_is_freed(path, data):  # noqa: ANN001, ANN202 - not even room for a shorter manifest
        if path.name == "manifest.json" and not freed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    def unlink(path):  # noqa: ANN001, ANN202
        freed.append(path.name)
        return real_unlink(path)

    monkeypatch.setattr(bank_module, "atomic_write", full_until_a_file_is_freed)
    monkeypatch.setattr(bank_module, "_unlink_regular", unlink)
    bank.remove("a")
    monkeypatch.undo()
    assert freed == ["a.safetensors"] and bank.names() == ["b"] and bank.verify() == {"b": "ok"}
    assert sorted(p.name for p in bank.path.iterdir()) == [".lock", "b.safetensors", "manifest.json"]


def test_remove_on_a_disk_that_stays_full_says_so_and_a_rerun_finishes_it(bank, monkeypatch):
    import errno

    from skillbank.storage import bank as bank_module

    real_write = bank_module.atomic_write

    def always_full(path, data):  # noqa: ANN001, ANN202
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(bank_module, "atomic_write", always_full)
    with pytest.raises(BankError, match="no space left .* after deleting 'a'.*run remove again"):
        bank.remove("a")
    monkeypatch.undo()
    with pytest.raises(SkillFileError, match="missing"):
        bank.get("a")
    assert bank.get("b").name == "b"
    bank.remove("a")  # with room again, the rerun completes it
    assert bank.names() == ["b"] and bank.verify() == {"b": "ok"}


def test_the_overlap_matrix_follows_the_masks_not_a_declared_parameter_size():
    from skillbank import Region, SkillMetadata
    from skillbank.integrations.plots import jaccard

    shapes = {"w": [2**40], "v": [3]}  # a crafted header: a 1-TiB parameter; a dense mask over it cannot be made

    def skill(name: str, w: list[int], v: list[int]) -> Skill:
        regions = {"w": Region(torch.tensor(w), torch.ones(len(w))), "v": Region(torch.tensor(v), torch.ones(len(v)))}
        return Skill(SkillMetadata(name, "f" * 64, 0.0, shapes), regions)

    matrix = jaccard([skill("a", [0, 2**40 - 1], [1]), skill("b", [2**40 - 1, 5], [1, 2])])
    assert matrix.tolist() == [[1.0, 2 / 5], [2 / 5, 1.0]]


def test_a_stitch_of_many_skills_parses_the_manifest_a_fixed_number_of_times(tmp_path, base_model, monkeypatch):
    from skillbank.stitching import stitch_out

    base_model.save_pretrained(tmp_path / "base")
    parses = []
    real = SkillBank._parse_manifest

    def counted(self, raw):  # noqa: ANN001, ANN202
        parses.append(1)
        return real(self, raw)

    counts = []
    for n in (3, 12):
        bank = SkillBank(tmp_path / f"bank{n}")
        for i in range(n):
            bank.add(make_skill(base_model, f"s{i}", seed=i))
        monkeypatch.setattr(SkillBank, "_parse_manifest", counted)
        parses.clear()
        stitch_out.stitch_to_folder(tmp_path / "base", SkillBank(bank.path), bank.names(), tmp_path / f"out{n}")
        monkeypatch.undo()
        counts.append(len(parses))
    assert counts[0] == counts[1] <= 2, counts  # linear in the skills: not one manifest parse per skill

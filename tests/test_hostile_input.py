"""Hostile input, round two (issue 29): one test per row of the red team's table, each failing on the code before.

Banks crafted by someone else, files that are not what they say, data sets with odd labels and outputs
pointed at special files: each is refused with one line that names it, or handled in time proportional
to its size, and nothing is lost.
"""

from __future__ import annotations

import json
import lzma
import multiprocessing
import os
import socket
import stat
from pathlib import Path

import pytest
import torch
from test_gpu_carry import carry  # noqa: F401 - the fixture that loads benchmarks/gpu_carry.py
from torch import nn

from helpers.banks import craft, swap_skill_file
from helpers.models import make_skill
from skillbank import Region, Skill, SkillBank, SkillFileError, SkillNameError, Stitcher
from skillbank.errors import SkillbankError
from skillbank.integrations.cli import main
from skillbank.integrations.table_data import MAX_LABELS, read_table
from skillbank.stitching.routing import SkillRouter, with_routing
from skillbank.stitching.union_support import UnionSupport


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


# -- files belong to exactly one skill -------------------------------------------------------------------------


def test_a_name_that_is_another_skills_versioned_file_is_refused_and_no_skill_is_lost(bank, base_model):
    entry = bank.replace(make_skill(base_model, "a", seed=3))  # a's file is now a.<sha12>.safetensors
    clash = entry.file.removesuffix(".safetensors")
    with pytest.raises(SkillNameError, match=f"{clash!r} would be stored in {entry.file}, skill 'a''s file"):
        bank.add(make_skill(base_model, clash, seed=4))
    assert bank.verify() == {"a": "ok", "b": "ok"}
    bank.remove("a")
    assert bank.verify() == {"b": "ok"} and not (bank.path / entry.file).exists()


def test_names_whose_versions_could_collide_are_refused_both_ways(bank, base_model):
    with pytest.raises(SkillNameError, match="is a versioned file name of skill 'a'"):
        bank.add(make_skill(base_model, "a.0123456789ab", seed=4))
    bank.add(make_skill(base_model, "c.0123456789ab", seed=5))
    with pytest.raises(SkillNameError, match="whose versions would take skill 'c.0123456789ab'"):
        bank.add(make_skill(base_model, "c", seed=6))
    assert bank.names() == ["a", "b", "c.0123456789ab"]


def test_a_manifest_whose_two_lines_name_one_file_is_refused_and_remove_deletes_nothing(bank, capsys):
    shared = "a.0123456789ab.safetensors"  # a's versioned file and skill a.0123456789ab's own: each valid alone
    (bank.path / "a.safetensors").rename(bank.path / shared)

    def edit(body):  # noqa: ANN001, ANN202
        body["skills"][0]["file"] = shared
        body["skills"][1].update(name="a.0123456789ab", file=shared)

    craft(bank.path, edit)
    assert main(["remove", str(bank.path), "a"]) == 2
    assert "its file 'a.0123456789ab.safetensors' is another entry's too" in capsys.readouterr().err
    assert (bank.path / shared).is_file() and (bank.path / "b.safetensors").is_file()


def test_files_a_killed_replace_leaves_are_reported_by_verify_and_removed_by_gc_only(bank, capsys):
    orphan = bank.path / "a.0123456789ab.safetensors"  # the new version, written before the manifest switch
    orphan.write_bytes((bank.path / "a.safetensors").read_bytes())
    assert main(["verify", str(bank.path)]) == 0
    out = capsys.readouterr().out
    assert "a.0123456789ab.safetensors" in out and "skillbank gc" in out and orphan.exists()
    assert main(["gc", str(bank.path)]) == 0 and "removed a.0123456789ab.safetensors" in capsys.readouterr().out
    assert not orphan.exists() and SkillBank(bank.path).verify() == {"a": "ok", "b": "ok"}
    assert main(["gc", str(bank.path)]) == 0 and "nothing to remove" in capsys.readouterr().out


def test_ten_thousand_replaces_keep_a_flat_bounded_chain(bank, base_model):
    skill = make_skill(base_model, "a", seed=3)
    for i in range(600):  # the nested chain hit Python's recursion limit at the 248th
        skill.metadata.metrics["round"] = float(i)
        bank.replace(skill)
    source = bank.get("a").metadata.source
    assert source["versions"] == 600 and len(source["replaces"]) == 16
    assert [r["metrics"]["round"] for r in source["replaces"][:2]] == [598.0, 597.0]
    assert all("replaces" not in (r["source"] or {}) for r in source["replaces"])


# -- no quadratic path on valid input --------------------------------------------------------------------------


def test_a_skill_covering_a_whole_tensor_is_found_in_a_few_probe_rounds_and_stitched_exactly(monkeypatch):
    rounds = []
    probe = UnionSupport._probe
    monkeypatch.setattr(UnionSupport, "_probe", lambda self, keys, attempt: rounds.append(attempt) or probe(self, keys, attempt))
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024, bias=False).eval()  # 1M entries, all covered
    base = model.weight.detach().clone()
    skill = Skill(
        metadata=_metadata(model),
        regions={"weight": Region(torch.arange(model.weight.numel()), torch.randn(model.weight.numel()) * 1e-3)},
    )
    stitcher = Stitcher(model, {"weight": base})
    stitcher.add(skill)
    assert torch.equal(model.weight.detach().flatten(), (base.flatten().double() + skill.regions["weight"].values).float())
    stitcher.remove("whole")
    assert torch.equal(model.weight.detach(), base)
    assert max(rounds) <= 40, max(rounds)  # a fixed probe step walked a contiguous run's block: thousands of rounds


def _metadata(model: nn.Module):  # noqa: ANN202
    from skillbank import SkillMetadata, base_fingerprint

    state = {"weight": model.weight.detach()}
    return SkillMetadata(name="whole", base_fingerprint=base_fingerprint(state), sparsity=1.0, shapes={"weight": [1024, 1024]})


def test_a_report_on_many_skills_lists_them_all_and_reads_only_the_detailed_ones(tmp_path, base_model, monkeypatch):
    bank = SkillBank(tmp_path / "bank")
    for i in range(30):
        bank.add(make_skill(base_model, f"s{i:02d}", seed=i, sparsity=0.01 + 0.001 * i))
    loaded = []
    real_get = SkillBank.get
    monkeypatch.setattr(SkillBank, "get", lambda self, name: loaded.append(name) or real_get(self, name))
    assert main(["report", str(bank.path), "--out", str(tmp_path / "r.html"), "--detailed", "5"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert sorted(loaded) == [f"s{i}" for i in range(25, 30)]  # the five largest, each read once
    assert all(f"<td>s{i:02d}</td>" in page for i in range(30)) and "the 5 largest of these 30 skills" in page
    assert main(["report", str(bank.path), "--out", str(tmp_path / "r.html"), "--detailed", "61"]) == 2


def test_labels_map_to_classes_in_one_pass_and_too_many_are_refused(tmp_path):
    path = tmp_path / "many.csv"
    path.write_text("text,label\n" + "".join(f"t{i},label-{i}\n" for i in range(MAX_LABELS + 1)))
    with pytest.raises(SkillbankError, match="10,001 distinct labels in 'label', more than 10,000 classes"):
        read_table(path)
    path.write_text("text,label\n" + "".join(f"t{i},c{i % 300}\n" for i in range(3000)))
    split, names = read_table(path)
    assert len(names) == 300 and [names[y] for y in split.labels[:3]] == ["c0", "c1", "c2"]


# -- outputs only ever replace regular files -----------------------------------------------------------------


# a socket stands in for a device: a regression must not replace the machine's own /dev/full (old code did)
@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "socket"])
def test_report_never_replaces_a_special_file_a_link_or_a_directory(bank, tmp_path, kind, capsys):
    out = tmp_path / "out.html"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        out.symlink_to(victim)
    elif kind == "directory":
        out.mkdir()
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(out))
        listener.close()
    before = os.lstat(out)
    assert main(["report", str(bank.path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was written" in err
    after = os.lstat(out)
    assert (stat.S_IFMT(after.st_mode), after.st_ino) == (stat.S_IFMT(before.st_mode), before.st_ino)
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("command", ["stitch", "export"])
def test_stitch_and_export_refuse_an_out_that_is_a_link(bank, tmp_path, command, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere)
    argv = (
        ["stitch", "--bank", str(bank.path), "--base", "unused", "--out", str(tmp_path / "out")]
        if command == "stitch"
        else ["export", str(bank.path), "a", "--base", "unused", "--out", str(tmp_path / "out")]
    )
    assert main(argv) == 2
    assert "not an empty directory" in capsys.readouterr().err and not any(elsewhere.iterdir())


def test_unpack_never_writes_through_a_link_stops_a_bomb_and_names_a_directory(carry, tmp_path):  # noqa: F811
    folder = tmp_path / "carry"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    with lzma.open(folder / "data.txt.xz", "wb") as f:
        f.write(b"hello\n")
    (folder / "data.txt.partial").symlink_to(victim)
    carry.unpack(folder)
    assert victim.read_text() == "keep" and (folder / "data.txt").read_bytes() == b"hello\n"
    with lzma.open(folder / "bomb.xz", "wb") as f:
        f.write(b"\0" * (3 << 20))
    with pytest.raises(SystemExit, match="expands past 2 MiB"):
        carry.unpack(folder, max_file=2 << 20)
    (folder / "bomb.xz").unlink()
    (folder / "x.xz").mkdir()
    with pytest.raises(SystemExit, match="x.xz is not a regular file"):
        carry.unpack(folder)


# -- every CLI failure is one line and the right exit code -----------------------------------------------------


def test_a_5000_digit_integer_in_a_manifest_is_one_line_for_every_command(bank, capsys):
    body = (bank.path / "manifest.json").read_text()
    (bank.path / "manifest.json").write_text(body.replace('"entries": ', '"entries": ' + "9" * 5000 + ', "x": ', 1))
    for argv in (["list", str(bank.path)], ["verify", str(bank.path)], ["list", str(bank.path), "--json"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged (not valid JSON" in err


def test_a_big_integer_in_a_manifest_and_a_5000_digit_one_in_a_skill_header(bank, capsys):
    craft(bank.path, lambda body: body["skills"][0].update(entries=2**80))
    assert main(["list", str(bank.path)]) == 2 and "'entries' is an integer beyond 2**53" in capsys.readouterr().err
    craft(bank.path, lambda body: body["skills"][0].update(entries=10))
    path = bank.path / "a.safetensors"
    data = path.read_bytes()
    forged = data.replace(b'\\"sparsity\\": 0.05', b'\\"sparsity\\": 0.05, \\"x\\": ' + b"7" * 5000, 1)
    assert forged != data
    swap_skill_file(bank, "a", _with_header_length(forged, len(data)))
    assert main(["verify", str(bank.path)]) == 1
    out = capsys.readouterr().out
    assert "unreadable skill header" in out and "b  " in out


def _with_header_length(data: bytes, old_size: int) -> bytes:
    length = int.from_bytes(data[:8], "little") + len(data) - old_size
    return length.to_bytes(8, "little") + data[8:]


def test_non_finite_metrics_are_strict_json_nulls(bank, capsys):
    craft(bank.path, lambda body: body["skills"][0].update(metrics={"loss": float("nan"), "acc": float("inf"), "f1": 0.5}))
    for argv in (["list", str(bank.path), "--json"], ["show", str(bank.path), "a", "--json"]):
        assert main(argv) == 0
        text = capsys.readouterr().out
        document = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        metrics = document["skills"][0]["metrics"] if "skills" in document else document["entry"]["metrics"]
        assert metrics == {"loss": None, "acc": None, "f1": 0.5}


def test_a_lock_that_is_a_directory_is_named_and_reads_still_work(bank, base_model, capsys):
    (bank.path / ".lock").unlink(missing_ok=True)
    (bank.path / ".lock").mkdir()
    assert main(["list", str(bank.path)]) == 0
    capsys.readouterr()
    assert main(["tag", str(bank.path), "a", "prod"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".lock is a directory" in err


def test_a_full_disk_while_tagging_is_one_line(bank, monkeypatch, capsys):
    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device", str(bank.path / "manifest.json"))

    monkeypatch.setattr("skillbank.storage.bank.atomic_write", full)
    assert main(["tag", str(bank.path), "a", "prod"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Free some space" in err
    assert SkillBank(bank.path).entry("a").tags == []


def test_a_reader_that_goes_away_is_a_quiet_exit(bank, monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return os.open(os.devnull, os.O_WRONLY)

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["list", str(bank.path), "--json"]) == 141
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_one_line_and_exit_130(bank, monkeypatch, capsys):
    def interrupted(args):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr("skillbank.integrations.cli.registry._list", interrupted)
    assert main(["list", str(bank.path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "skillbank list: interrupted; nothing half-written was left."


# -- reads do not write -----------------------------------------------------------------------------------------


def test_reading_commands_take_no_lock_and_clean_nothing(bank, tmp_path, capsys):
    (bank.path / ".lock").unlink()
    leftover = bank.path / f".tmp-{'ab' * 16}-a.safetensors"
    leftover.write_bytes(b"a crashed writer's")
    before = _listing(bank.path)
    for argv in (
        ["list", str(bank.path)],
        ["list", str(bank.path), "--json"],
        ["show", str(bank.path), "a"],
        ["verify", str(bank.path)],
        ["diff", str(bank.path), "a", "b"],
        ["report", str(bank.path), "--out", str(tmp_path / "r.html")],
    ):
        assert main(argv) in (0, 1), argv
    capsys.readouterr()
    assert _listing(bank.path) == before


def _open_bank(path: str, barrier) -> str:  # noqa: ANN001
    barrier.wait()
    try:
        SkillBank(path)
        return ""
    except SkillbankError as exc:
        return str(exc)


def _opener(paths: list[str], barrier, results) -> None:  # noqa: ANN001
    results.put([_open_bank(p, barrier) for p in paths])


def test_six_hundred_concurrent_first_opens_never_fail(tmp_path):
    context = multiprocessing.get_context("fork")
    workers, rounds = 12, 50
    barrier, results = context.Barrier(workers), context.Queue()
    paths = [str(tmp_path / f"bank{i}") for i in range(rounds)]
    procs = [context.Process(target=_opener, args=(paths, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    errors = [e for _ in procs for e in results.get(timeout=600) if e]
    for p in procs:
        p.join(timeout=60)
    assert errors == [] and all(p.exitcode == 0 for p in procs)
    assert all((Path(p) / "manifest.json").is_file() for p in paths)


# -- routing data checked against the base; values and indices checked ---------------------------------------


@pytest.mark.parametrize("width", [7, 65536])
def test_routing_centroids_of_another_width_are_named_when_the_router_is_built(base_model, width):
    skill = with_routing(make_skill(base_model, "wide", seed=1), torch.randn(2, width))
    with pytest.raises(SkillbankError, match=f"skill 'wide''s routing centroids are \\[2, {width}\\].*16 wide"):
        SkillRouter([skill], width=16)
    router = SkillRouter([skill])
    with pytest.raises(SkillbankError, match="cannot be routed"):
        router.scores(torch.randn(3, 16))


def test_a_skill_that_copies_anothers_centroids_is_reported_by_verify(tmp_path, base_model):
    bank = SkillBank(tmp_path / "bank")
    centroids = torch.randn(2, 16)
    bank.add(with_routing(make_skill(base_model, "a", seed=1), centroids))
    bank.add(with_routing(make_skill(base_model, "thief", seed=2), centroids.clone()))
    report = bank.verify()
    assert report["a"] == "ok" and "identical to 'a''s" in report["thief"]


def test_verify_reports_non_finite_values_and_indices_must_be_integers(bank, base_model):
    skill = make_skill(base_model, "a", seed=1)
    name = next(n for n, r in skill.regions.items() if len(r))
    skill.regions[name].values[0] = float("nan")
    swap_skill_file(bank, "a", skill.to_bytes())
    report = bank.verify()
    assert "NaN/Inf values" in report["a"] and report["b"] == "ok"
    with pytest.raises(SkillFileError, match="must be an integer tensor"):
        Region(torch.tensor([0.0, 1.7]), torch.ones(2))

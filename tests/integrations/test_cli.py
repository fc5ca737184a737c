"""The skillbank command line, driven as a user would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from helpers.models import finetune_like, live_copy, make_skill
from skillbank import SkillBank, Stitcher
from skillbank.integrations.cli import main


@pytest.fixture
def folders(tmp_path, base_model):
    base_model.save_pretrained(tmp_path / "base")
    for i in range(2):
        finetune_like(base_model, seed=i, num_labels=2 + i).save_pretrained(tmp_path / f"ft{i}")
    return tmp_path


def test_localize_list_show_verify_stitch_remove(folders, base_model, capsys):
    bank = folders / "bank"
    for i in range(2):
        assert (
            main(
                [
                    "localize",
                    "--base",
                    str(folders / "base"),
                    "--finetuned",
                    str(folders / f"ft{i}"),
                    "--bank",
                    str(bank),
                    "--name",
                    f"t{i}",
                    "--sparsity",
                    "0.02",
                ]
            )
            == 0
        )
    assert "added 't1'" in capsys.readouterr().out
    assert main(["list", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "t0" in out and "t1" in out and "dataless" in out
    assert main(["show", str(bank), "t1"]) == 0
    out = capsys.readouterr().out
    assert "classifier.weight" in out and "sparsity" in out
    assert main(["verify", str(bank)]) == 0
    assert "all 2 skills ok" in capsys.readouterr().out

    assert main(["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(folders / "out")]) == 0
    assert "\r" not in capsys.readouterr().err  # progress bars only on a terminal, not in a log
    reloaded = AutoModel.from_pretrained(folders / "out").eval()
    live = live_copy(base_model)
    stitcher = Stitcher(live, bank=SkillBank(bank))
    stitcher.add("t0")
    stitcher.add("t1")
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    torch.testing.assert_close(reloaded(ids).last_hidden_state, live.bert(ids).last_hidden_state, rtol=0, atol=0)
    head = load_file(folders / "out" / "heads" / "t1.safetensors")
    assert head["classifier.weight"].shape == (3, 16)
    card = (folders / "out" / "README.md").read_text()
    assert "| t0 |" in card
    # the card's recipe puts a head back with plain transformers: the same logits as the stitcher with that head
    recipe = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(folders / "out"))
    scope: dict = {}
    exec(recipe, scope)  # noqa: S102 - the card's own snippet, run as a user would paste it
    plain = scope["model"].eval()
    with stitcher.use_head("t0") as answering:
        torch.testing.assert_close(plain(ids).logits, answering(ids).logits, rtol=1e-5, atol=1e-6)

    assert main(["remove", str(bank), "t0"]) == 0
    assert SkillBank(bank).names() == ["t1"]


def test_a_pulled_alias_is_resolved_by_the_command_and_kept_in_the_provenance(folders, monkeypatch, capsys):
    """``--base pulled:minilm`` reads the pulled folder (here a tiny model in its place in the cache); the skill
    records the alias as typed, and the command, not the core, resolved it."""
    import shutil

    from helpers.models import pulled_minilm_folder

    monkeypatch.setenv("SKILLBANK_CACHE", str(folders / "cache"))
    shutil.copytree(folders / "base", pulled_minilm_folder(folders / "cache"))
    assert (
        main(
            [
                "localize",
                "--base",
                "pulled:minilm",
                "--finetuned",
                str(folders / "ft0"),
                "--bank",
                str(folders / "bank"),
                "--name",
                "t0",
                "--sparsity",
                "0.02",
            ]
        )
        == 0
    )
    skill = SkillBank(folders / "bank").get("t0")
    assert skill.metadata.source["base"] == "pulled:minilm" and skill.metadata.source["finetuned"] == str(folders / "ft0")
    capsys.readouterr()
    assert (
        main(
            [
                "localize",
                "--base",
                "pulled:bert",
                "--finetuned",
                str(folders / "ft0"),
                "--bank",
                str(folders / "bank"),
                "--name",
                "t1",
            ]
        )
        == 2
    )
    assert "unknown model 'pulled:bert'" in capsys.readouterr().err


def test_stitch_with_another_rule_records_it_in_the_card(folders, base_model, capsys):
    bank = folders / "bank"
    for i in range(2):
        main(
            [
                "localize",
                "--base",
                str(folders / "base"),
                "--finetuned",
                str(folders / f"ft{i}"),
                "--bank",
                str(bank),
                "--name",
                f"t{i}",
                "--sparsity",
                "0.3",
            ]
        )
    assert (
        main(
            ["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(folders / "out"), "--rule", "sign_mean"]
        )
        == 0
    )
    assert "rule 'sign_mean'" in capsys.readouterr().out
    assert "Overlap rule: `sign_mean`" in (folders / "out" / "README.md").read_text()
    reloaded = AutoModel.from_pretrained(folders / "out").eval()
    for rule, same in (("sign_mean", True), ("mean", False)):
        live = live_copy(base_model)
        stitcher = Stitcher(live, bank=SkillBank(bank), rule=rule)
        stitcher.add("t0")
        stitcher.add("t1")
        weight = "encoder.layer.0.attention.self.query.weight"
        assert torch.equal(reloaded.state_dict()[weight], live.bert.state_dict()[weight]) == same, rule
    with pytest.raises(SystemExit):
        main(["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(folders / "o2"), "--rule", "x"])


def test_stitch_composes_each_matrix_spectrally_when_asked(folders, base_model, capsys):
    from skillbank.stitching.spectral import spectral_delta

    bank = folders / "bank"
    for i in range(2):
        argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / f"ft{i}"), "--bank", str(bank)]
        assert main([*argv, "--name", f"t{i}", "--sparsity", "0.3"]) == 0
    out = folders / "out"
    argv = ["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(out), "--rule", "tsv_m"]
    assert main([*argv, "--scale", "1.5"]) == 0
    assert "rule 'tsv_m'" in capsys.readouterr().out
    assert "Composition: `tsv_m`" in (out / "README.md").read_text() and "scale s = 1.5" in (out / "README.md").read_text()
    reloaded = AutoModel.from_pretrained(out).eval().state_dict()
    skills = [SkillBank(bank).get(n) for n in ("t0", "t1")]
    delta = spectral_delta(skills, "tsv_m", 1.5)
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.output.LayerNorm.weight"):
        torch.testing.assert_close(reloaded[name], base_model.state_dict()[name] + delta[name], rtol=1e-5, atol=1e-6)
    assert set((out / "heads").iterdir()) == {out / "heads" / "t0.safetensors", out / "heads" / "t1.safetensors"}
    o2 = ["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(folders / "o2")]
    assert main([*o2, "--rule", "mean", "--scale", "2"]) == 2
    assert "--scale applies to a matrix composition" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stitch", "--base", str(folders / "base"), "--bank", str(bank), "--out", str(folders / "o3"), "--scale", "-1"])
    assert "give a finite number above 0" in capsys.readouterr().err


def test_stitch_a_subset_from_a_safetensors_file(folders, capsys):
    bank = folders / "bank"
    for i in range(2):
        main(
            [
                "localize",
                "--base",
                str(folders / "base"),
                "--finetuned",
                str(folders / f"ft{i}"),
                "--bank",
                str(bank),
                "--name",
                f"t{i}",
            ]
        )
    assert (
        main(
            [
                "stitch",
                "--base",
                str(folders / "base" / "model.safetensors"),
                "--bank",
                str(bank),
                "--skills",
                "t1",
                "--out",
                str(folders / "o"),
            ]
        )
        == 0
    )
    assert (folders / "o" / "model.safetensors").is_file() and not (folders / "o" / "heads" / "t0.safetensors").exists()


def test_bad_input_exits_2_with_a_reason(folders, capsys):
    (folders / "afile").write_text("x")
    code = main(
        [
            "localize",
            "--base",
            str(folders / "base"),
            "--finetuned",
            str(folders / "ft0"),
            "--bank",
            str(folders / "afile"),
            "--name",
            "a",
        ]
    )
    assert code == 2 and "is a file" in capsys.readouterr().err
    assert main(["show", str(folders / "nobank"), "x"]) == 2
    assert "no skill bank" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["localize", "--base", "b", "--finetuned", "f", "--bank", "k", "--name", "n", "--sparsity", "1.5"])
    assert exit_info.value.code == 2 and "(0, 1]" in capsys.readouterr().err
    main(
        [
            "localize",
            "--base",
            str(folders / "base"),
            "--finetuned",
            str(folders / "ft0"),
            "--bank",
            str(folders / "bank"),
            "--name",
            "t0",
        ]
    )
    assert (
        main(
            [
                "stitch",
                "--base",
                str(folders / "base"),
                "--bank",
                str(folders / "bank"),
                "--skills",
                "t0,zz",
                "--out",
                str(folders / "o"),
            ]
        )
        == 2
    )
    assert "no skill named 'zz'" in capsys.readouterr().err and not (folders / "o").exists()


def test_user_mistakes_get_a_one_line_reason_not_a_traceback(folders, base_model, capsys):
    bank = folders / "bank"
    SkillBank(bank).add(make_skill(base_model, "t0", seed=1))
    (folders / "bad.json").write_text("{not json")
    (folders / "list.json").write_text("[1, 2]")
    base, out = ["--base", str(folders / "base")], str(folders / "o")
    cases = [  # (argv, exit code, what stderr says)
        (["stitch", *base, "--bank", str(bank), "--skills", "", "--out", out], 2, "no skill names in ''; leave --skills out"),
        (["stitch", *base, "--bank", str(bank), "--skills", " , ", "--out", out], 2, "no skill names"),
        (
            [
                "localize",
                *base,
                "--finetuned",
                str(folders / "ft0"),
                "--bank",
                str(bank),
                "--name",
                "x",
                "--exclude",
                "[unclosed",
            ],
            2,
            r"'\[unclosed' is not a valid regular expression",
        ),
        (
            ["localize", *base, "--finetuned", str(folders / "base"), "--bank", str(bank), "--name", "x"],
            2,
            "equal the base's everywhere",
        ),
        (["plot", "overlap", str(bank), "--out", str(folders / "nowhere" / "x.png")], 2, "folder .*nowhere does not exist"),
        (["plot", "recovery", str(folders / "bad.json"), "--out", str(folders / "r.png")], 2, "bad.json is not readable JSON"),
        (["plot", "recovery", str(folders / "list.json"), "--out", str(folders / "r.png")], 2, "must map '<method> <sparsity>'"),
        (["plot", "arrivals", str(folders / "missing.json"), "--out", str(folders / "r.png")], 2, "missing.json does not exist"),
        (["list", str(folders / "nobank")], 2, "no skill bank at .*nobank .*check the path.*skillbank localize --bank"),
    ]
    for argv, code, words in cases:
        try:
            got = main(argv)
        except SystemExit as exit_info:  # argparse: the usage line, then the reason
            got = exit_info.code
        err = capsys.readouterr().err
        assert got == code and re.search(words, err) and "Traceback" not in err, (argv, got, err[-500:])
    assert not (folders / "o").exists() and SkillBank(bank).names() == ["t0"]


def test_json_outputs_follow_their_schema(folders, base_model, capsys):
    import json

    bank = SkillBank(folders / "bank")
    bank.add(make_skill(base_model, "t0", seed=1))
    bank.add(make_skill(base_model, "t1", seed=2))
    assert main(["list", str(bank.path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["schema"] == "skillbank.list/1" and [e["name"] for e in listed["skills"]] == ["t0", "t1"]
    entry_keys = {"name", "file", "bytes", "sha256", "task", "method", "sparsity", "entries", "value_dtype", "created", "metrics"}
    entry_keys |= {"tags", "note", "shared"}
    assert all(set(e) == entry_keys for e in listed["skills"])
    assert listed["skills"][0]["sha256"] == bank.entry("t0").sha256

    assert main(["show", str(bank.path), "t1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    skill = bank.get("t1")
    assert shown["schema"] == "skillbank.show/1" and shown["entry"]["name"] == "t1"
    assert shown["metadata"]["base_fingerprint"] == skill.metadata.base_fingerprint
    assert shown["entries"] == skill.num_entries == sum(shown["regions"].values()) and shown["shared"] == skill.num_shared
    assert shown["head"] == {"classifier.weight": [2, 16], "classifier.bias": [2]} and shown["centroids"] is None

    assert main(["verify", str(bank.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "schema": "skillbank.verify/1",
        "bank": str(bank.path),
        "ok": True,
        "skills": {"t0": "ok", "t1": "ok"},
        "orphans": [],
    }
    data = (bank.path / "t1.safetensors").read_bytes()
    (bank.path / "t1.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert main(["verify", str(bank.path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["skills"]["t0"] == "ok" and "sha256" in report["skills"]["t1"]


def test_diff_compares_two_skills_side_by_side(folders, base_model, capsys):
    from skillbank.integrations.plots import jaccard

    bank = SkillBank(folders / "bank")
    a, b = make_skill(base_model, "t0", seed=1, sparsity=0.1), make_skill(base_model, "t1", seed=2, sparsity=0.1)
    bank.add(a)
    bank.add(b)
    assert main(["diff", str(bank.path), "t0", "t1"]) == 0
    out = capsys.readouterr().out
    shared = len(
        {(n, i) for n, r in a.regions.items() for i in r.indices.tolist()}
        & {(n, i) for n, r in b.regions.items() for i in r.indices.tolist()}
    )
    assert f"mask overlap: {shared:,} shared entries, Jaccard {float(jaccard([a, b])[0, 1]):.4f}" in out
    assert re.search(rf"^entries\s+{a.num_entries:,}\s+{b.num_entries:,}$", out, re.M) and "entries in layer" in out
    assert re.search(r"^entries in (the embeddings|layer \d+ (attention|FFN|LayerNorm|bias))\s", out, re.M)
    assert " / " not in out  # was "in embeddings / embeddings"
    assert main(["diff", str(bank.path), "t0", "nope"]) == 2 and "no skill named 'nope'" in capsys.readouterr().err


def test_verify_exits_1_and_names_damaged_skills(folders, capsys):
    bank = folders / "bank"
    for i in range(2):
        main(
            [
                "localize",
                "--base",
                str(folders / "base"),
                "--finetuned",
                str(folders / f"ft{i}"),
                "--bank",
                str(bank),
                "--name",
                f"t{i}",
            ]
        )
    data = bytearray((bank / "t1.safetensors").read_bytes())
    data[-1] ^= 1
    (bank / "t1.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(bank)]) == 1
    captured = capsys.readouterr()
    assert "sha256" in captured.out and "t1" in captured.err


_HEAVY = """
import sys
from skillbank.integrations.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "lightning") if m in sys.modules))
"""


def test_help_list_and_remove_load_no_torch_transformers_or_lightning(tmp_path, base_model):
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "t0", seed=1))
    for argv in (["--help"], ["stitch", "--help"], ["list", str(bank.path)], ["remove", str(bank.path), "t0"]):
        result = subprocess.run([sys.executable, "-c", _HEAVY, *argv], capture_output=True, text=True, check=True)
        assert result.stdout.splitlines()[-1] == "[]", (argv, result.stdout[-300:], result.stderr[-300:])
    assert bank.names() == []


@pytest.mark.parametrize(
    "command",
    ["", "demo", "localize", "list", "show", "diff", "remove", "verify", "stitch", "export", "route", "pull", "plot", "report"],
)
def test_help_explains_every_command(command, capsys):
    """Checked in-process through the parser (the subprocess test above covers ``--help`` as a command)."""
    with pytest.raises(SystemExit) as done:
        main([*([command] if command else []), "--help"])
    assert done.value.code == 0
    usage, description, *rest = capsys.readouterr().out.split("\n\n")
    assert usage.startswith("usage: skillbank") and len(description) > 60 and rest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_stitching_recovers_the_finetunes(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    average = next(line for line in out.splitlines() if line.startswith("average")).split()
    base, finetuned, alone, stitched = map(float, average[1:])
    assert finetuned >= 0.95 and alone >= 0.9 and stitched >= 0.9 and base < 0.7
    assert SkillBank(tmp_path / "bank").names() == ["sentiment", "topic", "urgency"]
    # the README's table is this run's table, not a retyped one (rows compared number by number)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    shown = readme.split("```\ntask", 1)[1].split("```", 1)[0].splitlines()[1:]
    printed = [
        line.split() for line in out.splitlines() if line.split()[:1] in (["sentiment"], ["topic"], ["urgency"], ["average"])
    ]
    rows = [line.split() for line in shown if line.strip()]
    assert [r[0] for r in rows] == [p[0] for p in printed[-4:]], "regenerate the README table: skillbank demo"
    # Within 0.02: another CPU's float rounding may move a prediction or two. The base+head column (the base with a
    # head it was never trained with, near chance) moves more: the same code gave 0.514/0.352/0.388 on one box and
    # 0.558/0.280/0.404 on another (benchmarks/RESULTS.md, "Demo"), so it is held to 0.1.
    for row, run in zip(rows, printed[-4:]):
        allowed = (0.1, 0.02, 0.02, 0.02)
        assert all(abs(float(a) - float(b)) <= d for a, b, d in zip(row[1:], run[1:], allowed)), (
            row,
            run,
            "regenerate the README table",
        )


def test_localize_auto_sizes_the_skill_on_validation_texts(folders, capsys):
    import json

    from helpers.models import tiny_tokenizer

    tiny_tokenizer([f"w{i}" for i in range(59)]).save_pretrained(folders / "ft0")
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 59, (6,), generator=gen)), "label": n % 2} for n in range(64)
    ]
    (folders / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bank = folders / "bank"
    common = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "ft0"), "--bank", str(bank)]

    assert main([*common, "--name", "a", "--sparsity", "auto"]) == 2
    assert "--sparsity auto needs --val-data" in capsys.readouterr().err
    (folders / "bad.jsonl").write_text('{"text": "w1", "label": 0}\n{"text": "w2", "label": 7}\n')
    assert main([*common, "--name", "a", "--sparsity", "auto", "--val-data", str(folders / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: label 7 is outside 0..1" in capsys.readouterr().err

    assert (
        main([*common, "--name", "a", "--sparsity", "auto", "--target-recovery", "0.9", "--val-data", str(folders / "val.jsonl")])
        == 0
    )
    out = capsys.readouterr().out
    skill = SkillBank(bank).get("a")
    auto = skill.metadata.settings["auto"]
    assert auto["met"] and auto["target"] == 0.9 and skill.metadata.sparsity == auto["sparsity"]
    assert f"sparsity {auto['sparsity']:g} keeps the target" in out
    assert main(["list", str(bank)]) == 0
    listing = capsys.readouterr().out
    assert "recovery" in listing.splitlines()[0] and f"{auto['recovery']:.3f}" in listing


def test_tag_note_and_list_by_tag(folders, capsys):
    bank = str(folders / "bank")
    for i in range(2):
        argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / f"ft{i}"), "--bank", bank]
        assert (
            main([*argv, "--name", f"t{i}", "--sparsity", "0.02", *(["--tag", "prod", "--note", "from ft0"] if i == 0 else [])])
            == 0
        )
    assert main(["tag", bank, "t1", "beta", "prod"]) == 0 and main(["tag", bank, "t1", "beta", "--remove", "--note", "ok"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "t1: tags prod; note ok"
    assert main(["list", bank, "--tag", "prod", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["skills"]
    assert [(e["name"], e["tags"], e["note"]) for e in listed] == [("t0", ["prod"], "from ft0"), ("t1", ["prod"], "ok")]
    assert main(["list", bank, "--tag", "nope"]) == 0 and "no skill tagged 'nope'" in capsys.readouterr().out
    assert main(["list", bank]) == 0 and "tags" in capsys.readouterr().out.splitlines()[0]
    assert main(["show", bank, "t0"]) == 0 and "from ft0" in capsys.readouterr().out
    assert main(["tag", bank, "t0"]) == 2 and "nothing to change" in capsys.readouterr().err
    assert main(["tag", bank, "t0", "bad tag"]) == 2 and "invalid tags ['bad tag']" in capsys.readouterr().err
    argv = [
        "localize",
        "--base",
        str(folders / "base"),
        "--finetuned",
        str(folders / "ft1"),
        "--bank",
        bank,
        "--sparsity",
        "0.03",
    ]
    old_sha = SkillBank(bank).entry("t0").sha256
    assert main([*argv, "--name", "t0", "--replace"]) == 0 and "replaced 't0'" in capsys.readouterr().out
    replaced = SkillBank(bank).get("t0").metadata
    assert replaced.sparsity == 0.03 and replaced.source["replaces"][0]["sha256"] == old_sha
    assert SkillBank(bank).entry("t0").tags == ["prod"] and SkillBank(bank).entry("t0").note == "from ft0"
    assert main([*argv, "--name", "t9", "--replace"]) == 2 and "no skill named 't9'" in capsys.readouterr().err
    assert main([*argv, "--name", "t1"]) == 2 and "or --replace it" in capsys.readouterr().err


def test_warnings_are_one_line_of_their_own_and_library_noise_is_filtered(folders, capsys, monkeypatch):
    from transformers import BertModel

    from helpers.models import tiny_config

    torch.manual_seed(7)
    BertModel(tiny_config()).save_pretrained(folders / "other")  # another initialization: τ as large as the weights
    argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "other"), "--bank", str(folders / "b")]
    capsys.readouterr()
    assert main([*argv, "--name", "x"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("skillbank: warning: the task vector is as large as the weights"), err

    def noisy(args):  # noqa: ANN001, ANN202
        import warnings

        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()`", DeprecationWarning)
        return 0

    monkeypatch.setattr("skillbank.integrations.cli.registry._list", noisy)
    assert main(["list", str(folders / "b")]) == 0 and capsys.readouterr().err == ""


def test_localize_keeps_examples_show_lists_them_and_drop_examples_deletes_them(folders, capsys):
    from helpers.models import tiny_tokenizer

    tiny_tokenizer([f"w{i}" for i in range(59)]).save_pretrained(folders / "ft0")
    rows = [{"text": " ".join(f"w{(n * 7 + j) % 59}" for j in range(2 + n % 4)), "label": n % 2} for n in range(20)]
    (folders / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bank = str(folders / "bank")
    argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "ft0"), "--bank", bank, "--name", "a"]

    assert main([*argv, "--keep-examples", "3"]) == 2
    assert "--keep-examples N needs" in capsys.readouterr().err and not (folders / "bank" / "a.safetensors").exists()
    assert main([*argv, "--keep-examples", "3", "--examples-data", str(folders / "calib.jsonl")]) == 0
    assert "examples: 6 examples, 2 classes" in capsys.readouterr().out
    kept = SkillBank(bank).get("a").examples
    assert sorted(kept.labels.tolist()) == [0, 0, 0, 1, 1, 1] and set(kept.inputs) >= {"input_ids", "attention_mask"}
    assert kept.inputs["attention_mask"].sum(1).tolist() == (kept.inputs["input_ids"] != 0).sum(1).tolist()
    with_examples = SkillBank(bank).get("a")

    assert main(["show", bank, "a"]) == 0 and "examples  6 examples, 2 classes" in capsys.readouterr().out
    assert main(["show", bank, "a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"]["count"] == 6
    assert main(["drop-examples", bank, "a"]) == 0 and "dropped 6 examples from 'a'" in capsys.readouterr().out
    dropped = SkillBank(bank).get("a")
    assert dropped.examples is None and dropped.metadata.source["versions"] == 1
    for name, region in with_examples.regions.items():
        assert torch.equal(dropped.regions[name].values, region.values)
    assert main(["drop-examples", bank, "a"]) == 0 and "keeps no examples" in capsys.readouterr().out
    assert main(["show", bank, "a"]) == 0 and "examples  none" in capsys.readouterr().out


def test_stitch_calibrate_weighs_the_skills_on_their_kept_examples(folders, capsys):
    from safetensors.torch import load_file

    from helpers.models import tiny_tokenizer

    rows = [{"text": " ".join(f"w{(n * 5 + j) % 59}" for j in range(3 + n % 3)), "label": n % 2} for n in range(20)]
    (folders / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bank = str(folders / "bank")
    for i in range(2):
        tiny_tokenizer([f"w{i}" for i in range(59)]).save_pretrained(folders / f"ft{i}")
        argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / f"ft{i}"), "--bank", bank]
        common = ["--name", f"t{i}", "--sparsity", "0.3", "--examples-data", str(folders / "calib.jsonl")]
        assert main([*argv, *common, "--keep-examples", "4"]) == 0
    stitch = ["stitch", "--base", str(folders / "base"), "--bank", bank, "--rule", "tsv_m", "--scale", "2"]
    assert main([*stitch, "--out", str(folders / "plain")]) == 0
    assert main([*stitch, "--out", str(folders / "calibrated"), "--calibrate"]) == 0
    assert "calibrated on the skills' kept examples (distill)" in capsys.readouterr().out
    card = (folders / "calibrated" / "README.md").read_text()
    assert "Calibrated: each skill's part of each layer weighted" in card and "loss `distill`" in card
    assert "| t0 | " in card and "| t1 | " in card and "encoder.layer.1" in card
    plain, calibrated = (load_file(str(folders / f / "model.safetensors")) for f in ("plain", "calibrated"))
    assert plain.keys() == calibrated.keys()
    assert not torch.equal(plain["encoder.layer.1.output.dense.weight"], calibrated["encoder.layer.1.output.dense.weight"])
    assert torch.equal(plain["embeddings.LayerNorm.weight"], calibrated["embeddings.LayerNorm.weight"])  # not a matrix

    assert main([*stitch[:5], "--rule", "mean", "--out", str(folders / "x"), "--calibrate"]) == 2
    assert "--calibrate weighs the parts of a TSV-M composition: add --rule tsv_m" in capsys.readouterr().err
    assert main(["drop-examples", bank, "t1"]) == 0
    assert main([*stitch, "--out", str(folders / "y"), "--calibrate", "labels"]) == 2
    assert "skills ['t1'] keep no examples" in capsys.readouterr().err and not (folders / "y").exists()


def test_localize_low_rank_show_it_and_stitch_it_only_matrix_by_matrix(folders, capsys):
    from safetensors.torch import load_file

    from helpers.models import tiny_tokenizer

    bank = str(folders / "bank")
    argv = ["localize", "--base", str(folders / "base"), "--finetuned", str(folders / "ft0"), "--bank", bank]
    assert main([*argv, "--name", "lr", "--sparsity", "0.01", "--low-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "low-rank parts: " in out and "rank 2" in out and "--rule tsv_m" in out
    skill = SkillBank(bank).get("lr")
    assert skill.metadata.format_version == 2 and {p.rank for p in skill.low_rank.values()} == {2}
    assert main(["show", bank, "lr"]) == 0 and "low-rank  " in capsys.readouterr().out
    assert main([*argv, "--name", "x", "--method", "learned", "--low-rank", "2"]) == 2
    assert "made by the dataless method" in capsys.readouterr().err
    stitch = ["stitch", "--base", str(folders / "base"), "--bank", bank]
    assert main([*stitch, "--out", str(folders / "mean")]) == 2
    assert "carries low-rank parts" in capsys.readouterr().err and not (folders / "mean").exists()
    assert main([*stitch, "--rule", "iso_c", "--out", str(folders / "iso")]) == 0
    assert main(["export", bank, "lr", "--base", str(folders / "base"), "--out", str(folders / "alone")]) == 0
    exported = load_file(str(folders / "alone" / "model.safetensors"))
    name = "encoder.layer.1.attention.self.value.weight"
    region, part = skill.regions[name], skill.low_rank[name]
    tau = part.dense().reshape(-1).index_add(0, region.indices, region.values).reshape(part.shape)
    base = load_file(str(folders / "base" / "model.safetensors"))[name]
    assert torch.equal(exported["bert." + name], base + tau)  # base + low-rank part + sparse rest, exactly

    # sized on validation data: each size's skill is scored alone, composed matrix by matrix
    tiny_tokenizer([f"w{i}" for i in range(59)]).save_pretrained(folders / "ft0")
    rows = [{"text": " ".join(f"w{(n * 3 + j) % 59}" for j in range(4)), "label": n % 2} for n in range(32)]
    (folders / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([*argv, "--name", "auto", "--sparsity", "auto", "--low-rank", "1", "--val-data", str(folders / "val.jsonl")]) == 0
    auto = SkillBank(bank).get("auto")
    assert auto.low_rank and auto.metadata.settings["auto"]["tried"]

"""skillbank.integrations.plots: the numbers behind each plot, and the PNGs `skillbank plot` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.models import finetune_like, make_skill
from skillbank import SkillBank, skill_from_mask, task_vector
from skillbank.errors import SkillbankError
from skillbank.integrations.cli import main
from skillbank.integrations.plots import component, jaccard, layer_of, placement, plot_recovery

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "name,group,layer",
    [
        ("bert.embeddings.word_embeddings.weight", "embeddings", "embeddings"),
        ("bert.embeddings.LayerNorm.weight", "LayerNorm", "embeddings"),
        ("bert.encoder.layer.0.attention.self.key.weight", "attention", "layer 0"),
        ("bert.encoder.layer.1.attention.output.dense.bias", "bias", "layer 1"),
        ("bert.encoder.layer.1.intermediate.dense.weight", "FFN", "layer 1"),
        ("bert.encoder.layer.11.output.dense.weight", "FFN", "layer 11"),
        ("bert.encoder.layer.1.output.LayerNorm.bias", "LayerNorm", "layer 1"),
        ("bert.pooler.dense.weight", "other", "other"),
    ],
)
def test_component_and_layer_names(name: str, group: str, layer: str) -> None:
    assert component(name) == group
    assert layer_of(name) == layer


def _masked(base, name: str, positions: dict[str, list[int]]):  # noqa: ANN001, ANN202
    tv = task_vector(base, finetune_like(base, 1))
    return skill_from_mask(tv, {p: torch.tensor(i) for p, i in positions.items()}, name=name, sparsity=0.01, method="test")


def test_jaccard_counts_shared_positions(base_model) -> None:  # noqa: ANN001
    w, q = "encoder.layer.0.output.dense.weight", "encoder.layer.1.attention.self.query.weight"
    a = _masked(base_model, "a", {w: [0, 1, 2, 3]})
    b = _masked(base_model, "b", {w: [2, 3, 4], q: [0]})  # same flat offsets in another tensor are not shared
    c = _masked(base_model, "c", {q: [5]})
    matrix = jaccard([a, b, c])
    assert matrix[0, 1] == pytest.approx(2 / 6) and matrix[0, 2] == 0 and matrix[1, 2] == 0
    assert torch.equal(matrix, matrix.T) and torch.all(matrix.diagonal() == 1)
    assert placement(b) == {("layer 0", "FFN"): 3, ("layer 1", "attention"): 1}


def test_skills_of_other_models_are_not_compared(base_model) -> None:  # noqa: ANN001
    from dataclasses import replace

    tv = task_vector(base_model, finetune_like(base_model, 2))
    fewer = replace(tv, shared={k: v for k, v in tv.shared.items() if "pooler" not in k})
    other = skill_from_mask(fewer, {}, name="b", sparsity=0.01, method="test")
    with pytest.raises(SkillbankError, match="other parameters"):
        jaccard([make_skill(base_model, "a", 1), other])


def test_recovery_means_use_the_tasks_every_point_has() -> None:
    curve = {
        "dataless 0.01": {"x": 0.5, "y": 1.0, "z": 0.0},
        "dataless 0.1": {"x": 0.9, "y": 1.0, "z": 0.0},
        "learned 0.01": {"x": 1.0, "y": 0.8},
        "ft x": 0.9,
        "note": "ignored",
    }
    lines = plot_recovery(curve, Path(__import__("tempfile").mkdtemp()) / "r.png")
    assert lines == {"dataless": {0.01: 0.75, 0.1: 0.95}, "learned": {0.01: 0.9}}
    with pytest.raises(SkillbankError, match="no '<method> <sparsity>'"):
        plot_recovery({"ft x": 1.0}, "unused.png")


def test_skillbank_plot_writes_pngs(base_model, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bank = SkillBank(tmp_path / "bank")
    for i, name in enumerate(("sent", "topic", "spam")):
        bank.add(make_skill(base_model, name, seed=i + 1))
    for kind in ("overlap", "layers"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", kind, str(bank.path), "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == PNG
    text = capsys.readouterr().out
    assert "largest off the diagonal" in text and "sent:" in text
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"dataless 0.01": {"sent": 0.5}, "learned 0.01": {"sent": 0.99}}))
    assert main(["plot", "recovery", str(curve), "--out", str(tmp_path / "r.png")]) == 0
    assert "learned: 1% 0.990" in capsys.readouterr().out
    assert main(["plot", "overlap", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["plot", "overlap", str(bank.path), "--skills", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "nope" in capsys.readouterr().err


def test_heatmaps_read_on_a_fixed_scale_with_values_and_colour_bars(base_model, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from skillbank.integrations import plots

    bank = SkillBank(tmp_path / "bank")
    for i, name in enumerate(("sent", "topic")):
        bank.add(make_skill(base_model, name, seed=i + 1))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, out: figures.append(fig))
    matrix = plots.plot_overlap(bank, tmp_path / "o.png")
    heat, *bars = figures[0].axes
    assert heat.images[0].get_clim() == (0, 1) and len(bars) == 1  # diagonal and overlaps on one 0–1 scale, with its bar
    assert sorted(t.get_text() for t in heat.texts) == sorted(f"{v:.3f}" for v in matrix.flatten().tolist())
    shares = plots.plot_layers(bank, tmp_path / "l.png")
    panels = [ax for ax in figures[1].axes if ax.images]
    assert len(panels) == 2 and len(figures[1].axes) == 4  # one colour bar per panel
    for ax, name in zip(panels, ("sent", "topic")):
        assert ax.images[0].get_clim() == (0, 1)
        written = {t.get_text() for t in ax.texts}
        assert written and written <= {f"{v:.0%}" for v in shares[name].values()}


def test_report_is_one_page_with_the_table_overlap_and_layers_and_escapes_the_bank(base_model, tmp_path, capsys):
    bank = SkillBank(tmp_path / "bank")
    for i, task in enumerate(["<script>alert(1)</script>", "topic & more"]):
        skill = make_skill(base_model, f"s{i}", seed=i + 1)
        skill.metadata.task = task
        skill.metadata.metrics["val_acc"] = 0.5 + i / 4
        bank.add(skill)
    out = tmp_path / "report.html"
    assert main(["report", str(bank.path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "topic &amp; more" in page
    assert page.count('src="data:image/png;base64,') == 2  # the overlap heatmap and the layers plot, embedded
    assert "<td>s0</td><td>1</td>" in page and "<td>0.5</td>" in page and "<td>0.75</td>" in page
    assert {p.name for p in tmp_path.iterdir()} == {"bank", "report.html"}  # nothing staged is left behind
    assert main(["report", str(bank.path), "--out", str(tmp_path / "one.html"), "--skills", "s1"]) == 0
    assert "1 of 2 skills" in (tmp_path / "one.html").read_text()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--skills", "nope"], "['nope'] are not in"),
        (["--out", "/nonexistent/r.html"], "the folder /nonexistent does not exist"),
    ],
)
def test_report_mistakes_speak(base_model, tmp_path, capsys, args, says):
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "s0", seed=1))
    argv = ["report", str(bank.path), "--out", str(tmp_path / "r.html"), *args]
    assert main(argv) == 2
    assert says in capsys.readouterr().err
    SkillBank(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "holds no skills to report on" in capsys.readouterr().err

"""Routing: centroids stored with skills, nearest-centroid choice, and ``skillbank route``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers.models import finetune_like, make_skill, tiny_tokenizer
from skillbank import Skill, SkillBank
from skillbank.errors import SkillbankError, SkillFileError
from skillbank.integrations.cli import main
from skillbank.stitching.routing import SkillRouter, centroids, mean_pooled_features, routing_centroids, with_routing
from skillbank.storage.skill import MAX_CENTROIDS


def _batches(words: range, n: int, seed: int, batch_size: int = 8) -> list[dict]:
    """Token batches of ``n`` six-token texts drawn from ``words`` (ids), labelled by parity of their first token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(list(words))[torch.randint(0, len(words), (n, 6), generator=gen)]
    ids = torch.cat([torch.full((n, 1), 2), ids, torch.full((n, 1), 3)], 1)  # [CLS] ... [SEP]
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": torch.ones_like(ids[i : i + batch_size]),
            "labels": ids[i : i + batch_size, 1] % 2,
        }
        for i in range(0, n, batch_size)
    ]


def test_centroids_are_per_label_means_and_bounded():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    labels = torch.tensor([2, 2, 0, 0, 1])
    assert centroids(features, labels).tolist() == [[0.0, 3.0], [5.0, 5.0], [2.0, 0.0]]
    assert centroids(features, labels, max_centroids=2).tolist() == [[0.0, 3.0], [2.0, 0.0]]  # the most frequent
    torch.testing.assert_close(centroids(features), torch.tensor([[1.8, 2.2]]))
    with pytest.raises(SkillbankError, match="max_centroids"):
        centroids(features, labels, max_centroids=MAX_CENTROIDS + 1)
    with pytest.raises(SkillbankError, match="4 labels for 5"):
        centroids(features, labels[:4])


def test_centroids_travel_in_the_skill_file_and_bad_ones_are_refused(base_model, tmp_path):
    skill = with_routing(make_skill(base_model, "a", seed=1), torch.randn(3, 16))
    back = Skill.from_bytes(skill.to_bytes())
    assert torch.equal(back.centroids, skill.centroids)
    assert back.metadata.routing == {"features": "mean-pooled last hidden state of the base model", "centroids": 3, "dim": 16}
    assert Skill.from_bytes(make_skill(base_model, "b", seed=2).to_bytes()).centroids is None

    tensors = st_load(skill.to_bytes())
    header = {"skillbank": skill.metadata.to_json()}
    for bad, message in (
        (torch.full((2, 16), float("nan")), "NaN"),
        (torch.zeros(2, 3, 4), r"float \[C, D\]"),
        (torch.zeros(MAX_CENTROIDS + 1, 4), "C <="),
        (torch.zeros(2, 4, dtype=torch.int64), "float"),
    ):
        data = st_save({**tensors, "route/centroids": bad}, metadata=header)
        with pytest.raises(SkillFileError, match=message):
            Skill.from_bytes(data, origin="crafted.safetensors")
    with pytest.raises(SkillFileError, match="NaN"):
        with_routing(skill, torch.full((1, 16), float("inf"))).to_bytes()


def test_router_picks_each_input_s_own_skill_on_separable_tasks(base_model):
    tasks = {"low": range(5, 8), "high": range(50, 53)}  # disjoint vocabularies: separable under a random base
    skills = [
        with_routing(make_skill(base_model, name, seed=i), routing_centroids(base_model, _batches(words, 32, seed=i)))
        for i, (name, words) in enumerate(tasks.items())
    ]
    assert [len(s.centroids) for s in skills] == [2, 2]  # one per label
    router = SkillRouter(skills)
    assert router.names == ["low", "high"]
    for name, words in tasks.items():
        for batch in _batches(words, 40, seed=7):
            with torch.no_grad():
                chosen = router.route(mean_pooled_features(base_model, batch))
            assert chosen == [name] * len(batch["input_ids"])


def test_router_scores_are_the_best_cosine_per_skill():
    router = SkillRouter({"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[-1.0, 0.0]])})
    scores = router.scores(torch.tensor([[0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, -(2**-0.5)]]))
    assert router.route(torch.tensor([[0.0, 2.0], [-3.0, 0.0]])) == ["a", "b"]


def test_router_refuses_skills_without_routing_data_or_of_another_width(base_model):
    with pytest.raises(SkillbankError, match=r"skill 'b' has no routing data; localize it with examples"):
        SkillRouter([with_routing(make_skill(base_model, "a", seed=1), torch.randn(1, 16)), make_skill(base_model, "b", seed=2)])
    with pytest.raises(SkillbankError, match="differ in width"):
        SkillRouter({"a": torch.randn(1, 16), "b": torch.randn(1, 8)})
    with pytest.raises(SkillbankError, match="at least one skill"):
        SkillRouter([])


def test_cli_localize_stores_centroids_and_route_shows_the_choice(tmp_path, base_model, capsys):
    base_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer([f"w{i}" for i in range(59)]).save_pretrained(tmp_path / "base")
    bank = tmp_path / "bank"
    gen = torch.Generator().manual_seed(0)
    for i, (name, words) in enumerate({"low": range(5, 8), "high": range(50, 53)}.items()):
        finetune_like(base_model, seed=i).save_pretrained(tmp_path / name)
        rows = [
            {"text": " ".join(f"w{words[int(j)]}" for j in torch.randint(0, 3, (6,), generator=gen)), "label": n % 2}
            for n in range(32)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        assert (
            main(
                [
                    "localize",
                    "--base",
                    str(tmp_path / "base"),
                    "--finetuned",
                    str(tmp_path / name),
                    "--bank",
                    str(bank),
                    "--name",
                    name,
                    "--sparsity",
                    "0.02",
                    "--routing-data",
                    str(tmp_path / f"{name}.jsonl"),
                ]
            )
            == 0
        )
        assert "routing: 2 centroids of the base's features (16 wide)" in capsys.readouterr().out
    assert SkillBank(bank).get("high").centroids.shape == (2, 16)
    assert main(["show", str(bank), "low"]) == 0
    assert "2 centroids, 16 wide" in capsys.readouterr().out

    assert (
        main(["route", str(bank), "--base", str(tmp_path / "base"), "--text", "w50 w51 w52 w50", "--text", "w5 w6 w7\x1b[2J"])
        == 0
    )
    out = capsys.readouterr().out
    assert "w50 w51 w52 w50 -> high" in out and "w5 w6 w7\\x1b[2J -> low" in out and "\x1b" not in out

    (tmp_path / "plain").mkdir()
    finetune_like(base_model, seed=5).save_pretrained(tmp_path / "plain" / "ft")
    assert (
        main(
            [
                "localize",
                "--base",
                str(tmp_path / "base"),
                "--finetuned",
                str(tmp_path / "plain" / "ft"),
                "--bank",
                str(bank),
                "--name",
                "plain",
                "--sparsity",
                "0.02",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["route", str(bank), "--base", str(tmp_path / "base"), "--text", "w1"]) == 2
    assert "skill 'plain' has no routing data" in capsys.readouterr().err
    assert main(["route", str(bank), "--base", str(tmp_path / "base"), "--text", "w1", "--skills", "low,high"]) == 0

"""Task vectors, the base fingerprint, weight loading and dataless localization."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertModel

from helpers.models import finetune_like, tiny_config
from skillbank import (
    SkillbankError,
    TaskVectorError,
    align_names,
    base_fingerprint,
    load_weights,
    localize_dataless,
    task_vector,
)


def test_split_into_shared_and_head_across_a_wrapper_prefix(base_model):
    ft = finetune_like(base_model, seed=1)
    tv = task_vector(base_model, ft)
    assert set(tv.shared) == {k for k, v in base_model.state_dict().items() if v.is_floating_point()}
    assert set(tv.head) == {"classifier.weight", "classifier.bias"}
    name = "encoder.layer.0.output.dense.weight"
    expected = ft.bert.state_dict()[name] - base_model.state_dict()[name]
    assert torch.equal(tv.shared[name], expected)
    assert tv.names[name] == "bert." + name


def test_resized_embeddings_become_head(base_model):
    ft = finetune_like(base_model, seed=1)
    ft.resize_token_embeddings(80)
    tv = task_vector(base_model, ft)
    assert "embeddings.word_embeddings.weight" not in tv.shared
    assert "bert.embeddings.word_embeddings.weight" in tv.head


def test_head_patterns_force_shared_tensors_into_the_head(base_model):
    tv = task_vector(base_model, finetune_like(base_model, seed=1), head_patterns=[r"pooler\."])
    assert not any(k.startswith("pooler") for k in tv.shared)
    assert "bert.pooler.dense.weight" in tv.head


def test_nan_and_inf_task_vectors_are_refused(base_model):
    ft = finetune_like(base_model, seed=1)
    with torch.no_grad():
        ft.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(TaskVectorError, match="encoder.layer.1.output.dense.weight.*NaN/Inf"):
        task_vector(base_model, ft)
    ft = finetune_like(base_model, seed=1)
    with torch.no_grad():
        ft.classifier.bias[0] = float("inf")
    with pytest.raises(TaskVectorError, match="classifier.bias"):
        task_vector(base_model, ft)


def test_unrelated_models_share_nothing():
    with pytest.raises(TaskVectorError, match="share no floating-point parameter"):
        task_vector({"a.weight": torch.ones(2)}, {"b.weight": torch.ones(3)})


def test_the_base_passed_as_its_own_finetune_is_refused(base_model):
    with pytest.raises(TaskVectorError, match="equal the base's everywhere .*pass the finetuned model"):
        task_vector(base_model, base_model)


def test_a_finetune_of_another_base_is_warned_about(base_model):
    import warnings

    torch.manual_seed(123)
    other = BertModel(tiny_config()).eval()  # same architecture, other initialization: not a finetune of base_model
    with pytest.warns(
        UserWarning,
        match=r"as large as the weights themselves \(\|\|tau\|\| / \|\|theta_pre\|\| = 1\.[3-5]\d.*"
        "a finetune of this base",
    ):
        task_vector(base_model, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary finetune: no warning
        task_vector(base_model, finetune_like(base_model, seed=1))


def test_fingerprint_identifies_values_names_and_dtypes(base_model):
    state = base_model.state_dict()
    fp = base_fingerprint(state)
    assert fp == base_fingerprint({k: v.clone() for k, v in state.items()})
    nudged = dict(state)
    nudged["pooler.dense.bias"] = state["pooler.dense.bias"].clone()
    nudged["pooler.dense.bias"][0] += 1e-7
    assert base_fingerprint(nudged) != fp
    assert base_fingerprint({k: v.half() if v.is_floating_point() else v for k, v in state.items()}) != fp
    renamed = {("x." + k): v for k, v in state.items()}
    assert base_fingerprint(renamed) != fp


def test_align_names_prefers_the_prefix_that_matches_most():
    assert align_names(["a.w", "b.w"], ["a.w", "m.a.w", "m.b.w"]) == {"a.w": "m.a.w", "b.w": "m.b.w"}
    assert align_names(["m.a.w", "m.b.w"], ["a.w", "b.w"]) == {"m.a.w": "a.w", "m.b.w": "b.w"}


def test_load_state_dict_from_folder_file_and_refuses_pickle(tmp_path, base_model):
    base_model.save_pretrained(tmp_path / "model")
    state = load_weights(tmp_path / "model")
    assert torch.equal(state["pooler.dense.weight"], base_model.pooler.dense.weight)
    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], torch.ones(2))
    (tmp_path / "model.bin").write_bytes(b"not allowed")
    with pytest.raises(SkillbankError, match="safetensors"):
        load_weights(tmp_path / "model.bin")
    with pytest.raises(SkillbankError, match="does not exist"):
        load_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkillbankError, match="no model.safetensors"):
        load_weights(tmp_path / "empty")


def test_load_state_dict_reads_sharded_folders(tmp_path):
    torch.manual_seed(0)
    model = BertModel(tiny_config(hidden_size=64, intermediate_size=256)).eval()
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    state = load_weights(tmp_path)
    assert set(state) >= {k for k in model.state_dict() if "position_ids" not in k}
    assert torch.equal(state["encoder.layer.1.output.dense.weight"], model.encoder.layer[1].output.dense.weight)


def test_dataless_mask_is_global_topk_of_abs_tau(base_model):
    tv = task_vector(base_model, finetune_like(base_model, seed=2))
    skill = localize_dataless(tv, 0.03, name="t", task="demo")
    k = math.ceil(0.03 * tv.num_shared)
    assert skill.num_entries == k
    chosen = torch.cat([tv.shared[n].reshape(-1)[r.indices].abs() for n, r in skill.regions.items()])
    threshold = torch.cat([t.reshape(-1).abs() for t in tv.shared.values()]).topk(k).values.min()
    assert chosen.min() >= threshold
    for name, region in skill.regions.items():
        assert torch.equal(region.values, tv.shared[name].reshape(-1)[region.indices])
    assert skill.metadata.base_fingerprint == tv.base_fingerprint
    assert skill.metadata.method == "dataless" and skill.metadata.settings["k"] == k


def test_exclude_keeps_groups_out_of_the_mask_but_in_the_fingerprint(base_model):
    tv = task_vector(base_model, finetune_like(base_model, seed=2))
    skill = localize_dataless(tv, 0.05, name="t", exclude=["embeddings"])
    assert all(len(r) == 0 for n, r in skill.regions.items() if "embeddings" in n)
    eligible = sum(t.numel() for n, t in tv.shared.items() if "embeddings" not in n)
    assert skill.num_entries == math.ceil(0.05 * eligible)
    assert skill.metadata.base_fingerprint == tv.base_fingerprint


@pytest.mark.parametrize("bad", [0.0, 1.01, -1])
def test_localize_refuses_bad_sparsity(base_model, bad):
    tv = task_vector(base_model, finetune_like(base_model, seed=2))
    with pytest.raises(SkillbankError, match=r"\(0, 1\]"):
        localize_dataless(tv, bad, name="t")


def test_another_size_of_the_same_architecture_names_the_shapes_that_differ(base_model):
    from transformers import BertModel

    from helpers.models import tiny_config

    wider = BertModel(tiny_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(
        TaskVectorError,
        match=r"the names match but the shapes differ: embeddings\.word_embeddings\.weight \[64, 16\] vs \[64, 32\]",
    ):
        task_vector(base_model, wider)

"""PEFT LoRA finetunes as inputs (folder, PeftModel, LightningModule) and Hugging Face round trips (stitch, export)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification, BertModel

from helpers.models import learned, tiny_config
from skillbank import MaskLearner, SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.callbacks import SkillHarvester
from skillbank.errors import BaseMismatchError
from skillbank.integrations.cli import main
from skillbank.stitching.heads import use_head

NUM_LABELS = 3


def _lora(base: BertModel, seed: int = 0, steps: int = 8) -> PeftModel:
    """A rank-4 LoRA on query/value of a classifier built on ``base``, trained a few real Adam steps."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_labels=NUM_LABELS))
    model.bert.load_state_dict(base.state_dict())
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(5, 64, (8, 12), generator=generator)
        loss = peft_model(input_ids=ids, labels=(ids[:, 0] % NUM_LABELS)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


@pytest.fixture
def lora_setup(base_model: BertModel, tmp_path: Path) -> dict:
    base_model.save_pretrained(tmp_path / "base")
    peft_model = _lora(base_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return {"base": tmp_path / "base", "adapter": tmp_path / "adapter", "peft": peft_model, "root": tmp_path}


IDS = torch.tensor([[2, 7, 9, 11, 30, 3], [2, 40, 41, 5, 3, 0]])


def test_adapter_task_vector_is_peft_merge_and_classifier_is_the_head(lora_setup: dict, base_model: BertModel) -> None:
    peft_model = lora_setup["peft"]
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    tv = task_vector(lora_setup["base"], lora_setup["adapter"])
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, tau in tv.shared.items():
        torch.testing.assert_close(tau, merged.bert.state_dict()[name] - base_model.state_dict()[name], rtol=0, atol=1e-6)
    changed = {n for n, t in tv.shared.items() if t.abs().max() > 0}
    assert changed and all(".query." in n or ".value." in n for n in changed)  # LoRA touched only its targets
    assert set(tv.head) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(tv.head["classifier.weight"], merged.classifier.weight)
    assert tv.source["kind"] == "lora adapter" and tv.source["adapter_config"]["r"] == 4
    assert tv.source["modules_to_save"] == ["classifier", "score"]
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in before.items())  # merged on a copy
    in_memory = task_vector(base_model, peft_model)
    assert all(torch.equal(in_memory.shared[n], tv.shared[n]) for n in tv.shared)


def test_lora_skill_stitched_at_full_density_reproduces_the_peft_model(lora_setup: dict, base_model: BertModel) -> None:
    skill = localize_dataless(task_vector(lora_setup["base"], lora_setup["adapter"]), 1.0, name="lora")
    live = BertForSequenceClassification(tiny_config(num_labels=NUM_LABELS)).eval()
    live.bert.load_state_dict(base_model.state_dict())
    stitcher = Stitcher(live, base_model)
    stitcher.add(skill)
    with torch.no_grad(), stitcher.use_head("lora") as model:
        torch.testing.assert_close(model(input_ids=IDS).logits, lora_setup["peft"](input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_localize_stitch_export_round_trip_loads_with_plain_transformers(lora_setup: dict, base_model: BertModel, capsys) -> None:
    root, bank_dir = lora_setup["root"], lora_setup["root"] / "bank"
    assert (
        main(
            [
                "localize",
                "--base",
                str(lora_setup["base"]),
                "--finetuned",
                str(lora_setup["adapter"]),
                "--bank",
                str(bank_dir),
                "--name",
                "lora",
                "--sparsity",
                "0.05",
            ]
        )
        == 0
    )
    skill = SkillBank(bank_dir).get("lora")
    assert skill.metadata.source["kind"] == "lora adapter"
    assert skill.metadata.source["adapter_config"]["target_modules"] == ["query", "value"]
    assert json.loads(skill.metadata.to_json())["source"]["adapter_folder"] == str(lora_setup["adapter"])

    # in memory: base + the 5% LoRA skill, with its head
    live = BertForSequenceClassification(tiny_config(num_labels=NUM_LABELS)).eval()
    live.bert.load_state_dict(base_model.state_dict())
    stitcher = Stitcher(live, base_model, bank=SkillBank(bank_dir))
    stitcher.add("lora")
    with torch.no_grad(), stitcher.use_head("lora") as model:
        expected = model(input_ids=IDS).logits

    out = root / "stitched"
    assert main(["stitch", "--base", str(lora_setup["base"]), "--bank", str(bank_dir), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "| lora |" in card and "LoRA adapter \\(r=4" in card and "0.05" in card
    plain = AutoModelForSequenceClassification.from_pretrained(out, num_labels=NUM_LABELS).eval()
    with torch.no_grad(), use_head(plain, load_file(str(out / "heads" / "lora.safetensors"))) as model:
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(out), BertModel)

    exported = root / "exported"
    assert main(["export", str(bank_dir), "lora", "--base", str(lora_setup["base"]), "--out", str(exported)]) == 0
    dense = AutoModelForSequenceClassification.from_pretrained(exported).eval()  # no skillbank, no head swap
    assert dense.config.num_labels == NUM_LABELS
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    assert "single-task model" in (exported / "README.md").read_text()
    assert main(["export", str(bank_dir), "lora", "--base", str(lora_setup["base"]), "--out", str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_adapter_from_another_base_is_refused(lora_setup: dict, tmp_path: Path, capsys) -> None:
    model = BertForSequenceClassification(tiny_config(hidden_size=8, intermediate_size=16, num_labels=NUM_LABELS))
    get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])).save_pretrained(
        tmp_path / "foreign"
    )
    with pytest.raises(BaseMismatchError, match="does not fit this base"):
        task_vector(lora_setup["base"], tmp_path / "foreign")
    assert (
        main(
            [
                "localize",
                "--base",
                str(lora_setup["base"]),
                "--finetuned",
                str(tmp_path / "foreign"),
                "--bank",
                str(tmp_path / "bank"),
                "--name",
                "x",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not fit this base" in err and "Pass the base model the adapter was trained from" in err
    assert "x" not in SkillBank(tmp_path / "bank").names()


class LoraModule(pl.LightningModule):
    """A LightningModule that finetunes a PEFT model, as users write them."""

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.model = peft_model

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_harvester_and_mask_learner_take_a_lora_lightning_module(base_model: BertModel, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=NUM_LABELS))
    model.bert.load_state_dict(base_model.state_dict())
    module = LoraModule(get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])))
    ids = torch.randint(5, 64, (32, 10), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids[:, 0] % NUM_LABELS), batch_size=8)
    harvester = SkillHarvester(tmp_path / "bank", "lora-task", sparsity=0.05)  # base captured from the PEFT model
    pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[harvester],
    ).fit(module, data)
    skill = SkillBank(tmp_path / "bank").get("lora-task")
    assert skill.metadata.source["kind"] == "lora adapter" and skill.metadata.source["module"] == "LoraModule"
    assert set(skill.head) == {"classifier.weight", "classifier.bias"}
    expected = localize_dataless(task_vector(base_model, module), 0.05, name="lora-task")
    assert all(torch.equal(skill.regions[n].indices, r.indices) for n, r in expected.regions.items())

    learner = MaskLearner(module.model, base_model, spec=learned(0.05), num_labels=NUM_LABELS)  # a PeftModel in memory
    skill_learned = learner.learn([{"input_ids": ids[:16], "labels": ids[:16, 0] % NUM_LABELS}], epochs=2, name="lora-learned")
    assert skill_learned.metadata.source["kind"] == "lora adapter" and skill_learned.num_entries == expected.num_entries
    assert any("lora" in n for n in module.model.state_dict())  # the user's PEFT model is still a PEFT model

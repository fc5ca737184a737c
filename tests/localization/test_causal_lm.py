"""Causal language models as skills: tied embeddings counted once, the next-token loss with padding ignored,
a learned mask, stitching, generation, and the paper's embeddings/LM-head exclusion."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from helpers.models import learned, tiny_llama_config
from skillbank import MaskLearner, SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.localization.causal_lm import LM_EXCLUDE, NextTokenAccuracy, with_lm_labels
from skillbank.vectors.models import load_model

VOCAB = 40


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'finetune': every float tensor plus seeded noise (tied tensors once, as training would move them)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():  # parameters() yields a tied tensor once
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def lm_batches(n: int = 32, length: int = 12, seed: int = 0) -> DataLoader:
    """Sequences that count up by one (mod the vocabulary), right-padded to ``length``."""
    gen = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for _ in range(n):
        start, size = int(torch.randint(3, VOCAB, (1,), generator=gen)), int(torch.randint(6, length + 1, (1,), generator=gen))
        ids = [(start + i) % (VOCAB - 3) + 3 for i in range(size)]
        rows.append(ids + [0] * (length - size))
        masks.append([1] * size + [0] * (length - size))
    data = [{"input_ids": torch.tensor(r), "attention_mask": torch.tensor(m)} for r, m in zip(rows, masks)]
    return DataLoader(data, batch_size=8)


def test_tied_embeddings_are_one_tensor_in_the_task_vector_whatever_the_source(tmp_path):
    base, ft = gpt2(), perturbed(gpt2(), seed=1)
    from_modules = task_vector(base, ft)
    assert "lm_head.weight" not in from_modules.shared and "lm_head.weight" not in from_modules.head
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    from_folders = task_vector(tmp_path / "base", tmp_path / "ft")
    assert from_folders.base_fingerprint == from_modules.base_fingerprint
    assert set(from_folders.shared) == set(from_modules.shared)
    for name, tau in from_modules.shared.items():
        assert torch.equal(from_folders.shared[name], tau), name
    # stitched into a live GPT-2, the tied LM head follows the input embedding: one tensor, one value
    skill = localize_dataless(from_modules, 0.1, name="s")
    live = gpt2()
    Stitcher(live, base).add(skill)
    assert live.lm_head.weight.data_ptr() == live.transformer.wte.weight.data_ptr()
    assert not torch.equal(live.transformer.wte.weight, base.transformer.wte.weight)


def test_lm_labels_ignore_padding_and_the_learner_uses_the_next_token_loss():
    batch = next(iter(lm_batches()))
    labelled = with_lm_labels(batch)
    assert torch.equal(labelled["labels"] == -100, batch["attention_mask"] == 0)
    assert with_lm_labels({**batch, "labels": batch["input_ids"]})["labels"] is batch["input_ids"]  # its own kept
    base, ft = llama(), perturbed(llama(), seed=2)
    learner = MaskLearner(copy.deepcopy(ft), base, spec=learned(0.05))
    loss, logits, target = learner(batch, gate=torch.ones_like(learner.tau))
    expected = ft(**labelled).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert logits.shape == (*batch["input_ids"].shape, VOCAB) and torch.equal(target, labelled["labels"])
    assert isinstance(learner.val_acc, NextTokenAccuracy)


def test_next_token_accuracy_counts_shifted_unpadded_positions():
    metric = NextTokenAccuracy()
    labels = torch.tensor([[5, 6, 7, -100]])
    logits = torch.full((1, 4, VOCAB), -1.0)
    logits[0, 0, 6] = 1.0  # predicts 6 after 5: right
    logits[0, 1, 9] = 1.0  # predicts 9 after 6: wrong (7)
    logits[0, 2, 3] = 1.0  # the next label is padding: not counted
    metric.update(logits, labels)
    assert float(metric.compute()) == pytest.approx(0.5)


def test_a_learned_lm_skill_is_banked_stitched_and_generates(tmp_path):
    base = llama()
    ft = perturbed(base, seed=3)
    learner = MaskLearner(
        copy.deepcopy(ft), base, spec=learned(0.05, exclude=LM_EXCLUDE), bank=str(tmp_path / "bank"), skill_name="count"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(learner, lm_batches(), lm_batches(n=16, seed=1))
    skill = SkillBank(tmp_path / "bank").get("count")
    assert "val_acc" in skill.metadata.metrics and 0 <= skill.metadata.metrics["val_acc"] <= 1
    assert skill.num_entries == learner.k
    assert not any(len(r) for n, r in skill.regions.items() if "embed_tokens" in n or "lm_head" in n)
    live = copy.deepcopy(base)
    stitcher = Stitcher(live, base, bank=SkillBank(tmp_path / "bank"))
    stitcher.add("count")
    for name, region in skill.regions.items():
        flat = live.state_dict()[name].view(-1)
        assert torch.equal(flat[region.indices], (base.state_dict()[name].view(-1)[region.indices] + region.values)), name
    prompt = torch.tensor([[1, 5, 6, 7]])
    out = live.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8) and torch.equal(out[:, :4], prompt)
    stitcher.remove("count")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in live.state_dict().items())


def test_lm_exclude_leaves_embeddings_and_lm_heads_out(tmp_path):
    for make in (llama, gpt2):
        base = make()
        skill = localize_dataless(task_vector(base, perturbed(base, seed=4)), 0.2, name="s", exclude=LM_EXCLUDE)
        chosen = {n for n, r in skill.regions.items() if len(r)}
        assert chosen and not any(("embed" in n or "wte" in n or "wpe" in n or "lm_head" in n) for n in chosen), chosen


def test_a_causal_lm_folder_loads_as_a_causal_lm(tmp_path):
    llama().save_pretrained(tmp_path / "lm")
    assert type(load_model(str(tmp_path / "lm"))).__name__ == "LlamaForCausalLM"

"""docs/methods.md's "Causal language models": a tiny Llama finetuned to count, its skill learned with the next-token
loss (padding ignored, embeddings and LM head left out as in the paper), banked, stitched, and generating.

    python examples/causal_lm.py [WORKDIR]      # default: ./causal-lm-example
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from skillbank import LocalizationSpec, MaskLearner, SkillBank, Stitcher
from skillbank.localization.causal_lm import LM_EXCLUDE

warnings.filterwarnings("ignore", ".*(does not have many workers|eval mode|LeafSpec).*")
VOCAB, PAD = 32, 0


def counting(n: int, seed: int) -> DataLoader:
    """Right-padded runs of consecutive tokens (3, 4, 5, …): what the finetune learns to continue."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, size = int(torch.randint(3, 20, (1,), generator=gen)), int(torch.randint(5, 11, (1,), generator=gen))
        ids = list(range(start, start + size)) + [PAD] * (10 - size)
        rows.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor([1] * size + [0] * (10 - size))})
    return DataLoader(rows, batch_size=16)


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        pad_token_id=PAD,
    )
    base = LlamaForCausalLM(config).eval()
    finetuned = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(finetuned.parameters(), lr=3e-3)
    for _ in range(6):  # the finetune: learn to count
        for batch in counting(256, seed=0):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            finetuned(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    bank = SkillBank(workdir / "skills")
    if "count" in bank:  # a rerun: replace the earlier copy
        bank.remove("count")
    spec = LocalizationSpec(method="learned", sparsity=0.05, exclude=LM_EXCLUDE)
    learner = MaskLearner(finetuned.eval(), base, spec=spec, bank=str(bank.path), skill_name="count")
    pl.Trainer(
        max_epochs=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(learner, counting(64, seed=1), counting(32, seed=2))

    live = copy.deepcopy(base)
    stitcher = Stitcher(live, base, bank=bank)
    stitcher.add("count")
    prompt = torch.tensor([[7, 8, 9]])
    out = live.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    skill = bank.get("count")
    print(
        f"count: {skill.num_entries:,} entries (next-token val_acc {skill.metadata.metrics['val_acc']:.3f}); "
        f"base + skill continues 7 8 9 with {out[0, 3:].tolist()}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "causal-lm-example"))

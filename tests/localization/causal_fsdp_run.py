"""Child script of the FSDP2 causal-LM test: ``python causal_fsdp_run.py DEVICES OUT [EXCLUDE...]``.

A tiny Llama with tied input and output embeddings (as small Llamas ship), a "finetune" of
it (seeded noise), and a learned 5% mask on random token sequences (next-token loss,
full-batch updates): in one process with the flat learner (``DEVICES`` 1), or sharded with
``ModelParallelStrategy`` over ``DEVICES`` CPU processes. Rank 0 saves the mask's indices
to ``OUT``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers.ddp_teardown import teardown  # noqa: E402
from helpers.models import learned, tiny_llama_config  # noqa: E402
from skillbank import MaskLearner  # noqa: E402


def main(devices: int, out: str, exclude: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval()
    finetuned = LlamaForCausalLM(config).eval()
    finetuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loader = DataLoader([{"input_ids": ids} for ids in torch.randint(0, 64, (16, 12))], batch_size=8 // devices)
    spec = learned(0.05, exclude=exclude, full_batch=True, keep_best=False)
    learner = MaskLearner(finetuned, {k: v.clone() for k, v in base.state_dict().items()}, spec=spec)
    sharded = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=sharded if devices > 1 else "auto",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, loader)
    if trainer.is_global_zero:
        assert learner.skill is not None
        torch.save({name: region.indices for name, region in learner.skill.regions.items()}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
    teardown()

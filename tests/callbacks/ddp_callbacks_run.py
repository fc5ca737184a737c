"""Child script of the callbacks' DDP test: ``python ddp_callbacks_run.py harvest|fsdp-harvest|stitch WORKDIR``.

``harvest``: a 2-process finetune with SkillHarvester (bank ``WORKDIR/bank``).
``fsdp-harvest``: the same under ModelParallelStrategy (FSDP2, the model sharded block by block),
its finetuned weights kept in ``WORKDIR/finetuned/sentiment`` in files of ~20 KB; rank 0 also
writes the trained weights, gathered whole, to ``WORKDIR/trained.pt`` for the test to compare.
``stitch``: a 2-process run of a frozen model with SkillStitcher over the bank the
test filled; each rank writes what it stitched, in order, and a digest of its
weights to ``WORKDIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import BertModel

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers.ddp_teardown import teardown  # noqa: E402
from helpers.models import live_copy, tiny_config  # noqa: E402
from helpers.modules import Watcher, quiet_trainer, task_loader  # noqa: E402
from skillbank.callbacks import SkillHarvester, SkillStitcher, _sharded_weights  # noqa: E402
from skillbank.integrations.classifier import SequenceClassifier  # noqa: E402
from skillbank.vectors.weights import tensor_digest  # noqa: E402


class Report(pl.Callback):
    def __init__(self, workdir: Path, stitcher: SkillStitcher) -> None:
        self.workdir, self.stitcher = workdir, stitcher

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = {k: tensor_digest(v) for k, v in pl_module.model.state_dict().items()}
        report = {"stitched": self.stitcher.stitched, "history": self.stitcher.history, "digest": digest}
        (self.workdir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main(mode: str, workdir: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    ddp = dict(devices=2, strategy="ddp", enable_checkpointing=False)
    if mode == "harvest":
        module = SequenceClassifier(live_copy(base), num_labels=2, lr=0.05, optimizer="sgd")
        harvester = SkillHarvester(workdir / "bank", "sentiment", sparsity=0.05)
        quiet_trainer(max_steps=4, callbacks=[harvester], **ddp).fit(module, task_loader(), task_loader(n=32, seed=1))
    elif mode == "fsdp-harvest":
        _sharded_weights.SHARD_BYTES = 20_000  # several files from a tiny model
        module = SequenceClassifier(live_copy(base), num_labels=2, lr=0.05, optimizer="sgd")
        harvester = SkillHarvester(
            workdir / "bank", "sentiment", sparsity=0.05, finetuned_dir=workdir / "finetuned", keep_finetuned=True
        )
        fsdp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = quiet_trainer(max_steps=4, callbacks=[harvester], devices=2, strategy=fsdp, enable_checkpointing=False)
        trainer.fit(module, task_loader(), task_loader(n=32, seed=1))
        trained = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            torch.save(trained, workdir / "trained.pt")
    else:
        stitcher = SkillStitcher(workdir / "bank", base=base, every_n_steps=2)
        module = Watcher(live_copy(base))
        quiet_trainer(max_steps=4, callbacks=[stitcher, Report(workdir, stitcher)], **ddp).fit(module, task_loader())


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    teardown()

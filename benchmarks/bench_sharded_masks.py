"""Memory per rank of mask learning: one process, DDP and FSDP2 (ModelParallelStrategy) on CPU processes (issue 33).

    python benchmarks/bench_sharded_masks.py --out /tmp/sharded [--layers 12] [--steps 3] [--configs fsdp-4]

A BERT-base-shaped classifier (hidden 768, 12 layers, vocabulary 30522: ~110M
parameters, random init; no download) and a "finetune" of it (the base plus seeded
noise on every entry). Each configuration runs in its own processes: by default the
flat learner in one process, the flat learner replicated over 2 DDP processes, and the
sharded learner (``ModelParallelStrategy(data_parallel_size=N)``) over 1 and 2
processes (``--configs`` names others); each with full scoring and with a pool of 30·k, at 1%, for ``--steps``
Adam updates on random tokens (4 sequences of 64 a rank). Every rank reports:

* ``state_bytes``: ``MaskLearner.state_nbytes`` (its part of τ, the scores, Adam's
  moments, pool positions);
* ``base_bytes``: the bytes of the wrapped model's parameters it holds (its shards);
* ``imports_rss``, ``start_rss``: resident memory after the imports, and when training starts
  (the state is built and sharded; Adam's moments come with the first step);
* ``init_peak``: peak resident memory (``VmHWM``) up to the start of training: building
  the models and the learner, before sharding;
* ``train_peak``: peak resident memory from the start of training to its end (``VmHWM``
  reset through ``/proc/self/clear_refs``; Linux), the figure sharding divides.

The children run with ``MALLOC_MMAP_THRESHOLD_=65536``, so that memory freed before
training (the flat copies the sharded learner drops) leaves the resident set.

Writes ``sharded_masks.json`` and prints a markdown table. ``--child`` runs one
configuration (Lightning relaunches it once per extra rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"flat": "one process (flat)", "ddp": "DDP (flat, replicated)", "fsdp": "FSDP2"}  # --configs' strategies


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def child(args: argparse.Namespace) -> None:
    import warnings

    import lightning.pytorch  # noqa: F401 - the imports' resident memory, reported apart
    import transformers  # noqa: F401

    import skillbank.localization.mask_learner  # noqa: F401

    imports = _status("VmRSS")

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertConfig, BertForSequenceClassification

    from skillbank import LearnerSpec, LocalizationSpec, MaskLearner

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=args.layers, num_labels=2)  # BERT-base's shape otherwise
    base = BertForSequenceClassification(config).eval()
    finetuned = BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, b), f in zip(base.state_dict().items(), finetuned.state_dict().values()):
            f.copy_(b + 1e-3 * torch.randn(b.shape, generator=generator) if b.is_floating_point() else b)
    base_state = {k: v for k, v in base.state_dict().items() if v.is_floating_point()}
    del base
    pool = 30.0 if args.scoring == "pool" else None
    spec = LocalizationSpec(method="learned", sparsity=0.01, learner=LearnerSpec(pool=pool, keep_best=False, lr=0.05))
    learner = MaskLearner(finetuned, base_state, spec=spec, loss_fn=torch.nn.CrossEntropyLoss())
    parameters = sum(p.numel() for p in learner.model.parameters())  # whole, before any sharding
    del base_state, finetuned
    ids = torch.randint(0, config.vocab_size, (8 * args.processes * args.steps, 64), generator=generator)
    labels = torch.randint(0, 2, (ids.shape[0],), generator=generator)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=4)
    report: dict[str, float] = {"imports_rss": imports}

    class Measure(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            report["init_peak"] = _status("VmHWM")
            report["start_rss"] = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
            report["started"] = time.perf_counter()

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            report["train_peak"] = _status("VmHWM")
            report["seconds_per_step"] = (time.perf_counter() - report.pop("started")) / max(1, trainer.global_step)
            report["state_bytes"] = learner.state_nbytes
            base = [p for n, p in learner.model.named_parameters() if ".parametrizations." not in n or n.endswith(".original")]
            local = [getattr(p, "to_local", lambda p=p: p)() for p in base]  # not τ and the scores, which FSDP2 holds there
            report["base_bytes"] = sum(p.numel() * p.element_size() for p in local)
            report["rank"] = trainer.global_rank

    strategy: object = "auto"
    if args.strategy == "ddp":
        strategy = "ddp"
    elif args.strategy == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=args.processes, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.processes,
        strategy=strategy,  # type: ignore[arg-type]
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Measure()],
    )
    trainer.fit(learner, loader)
    report.update(parameters=parameters, scored=learner.num_eligible)
    Path(args.out, f"{args.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(report))
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the per-rank reports and sharded_masks.json")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12: BERT-base, ~110M parameters)")
    parser.add_argument("--steps", type=int, default=3, help="Adam updates a run")
    parser.add_argument(
        "--configs",
        default="flat-1,ddp-2,fsdp-1,fsdp-2",
        help="STRATEGY-PROCESSES pairs to run (flat, ddp, fsdp; default %(default)s), e.g. fsdp-4",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="flat", help=argparse.SUPPRESS)
    parser.add_argument("--scoring", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return
    # every allocation of 64 KiB or more its own mapping, given back when freed: resident memory then follows what
    # is alive (glibc's default threshold climbs to 32 MiB, and a freed layer's weights would stay resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for scoring in ("full", "pool"):
        for tag in args.configs.split(","):
            strategy, processes = tag.split("-")[0], int(tag.split("-")[1])
            name = CONFIGS[strategy]
            tag = f"{strategy}-{processes}-{scoring}"
            command = [sys.executable, __file__, "--child", "--out", args.out, "--layers", str(args.layers)]
            command += ["--steps", str(args.steps), "--processes", str(processes), "--strategy", strategy]
            command += ["--scoring", scoring, "--tag", tag]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{tag} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(args.out, f"{tag}-rank{r}.json").read_text()) for r in range(processes)]
            row = {"config": name, "processes": processes, "scoring": scoring, "wall": time.perf_counter() - started}
            for key in ("state_bytes", "base_bytes", "imports_rss", "start_rss", "init_peak", "train_peak", "seconds_per_step"):
                row[key] = max(r[key] for r in ranks)  # the largest rank
            row["parameters"], row["scored"] = ranks[0]["parameters"], ranks[0]["scored"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out, "sharded_masks.json").write_text(json.dumps(rows, indent=2))
    mb = 1 << 20
    print(
        "\n| scoring | configuration | processes | learner state / rank | base / rank | resident at start / rank "
        "| peak in training / rank | peak building / rank | s / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scoring']} | {r['config']} | {r['processes']} | {r['state_bytes'] / mb:,.0f} MiB | "
            f"{r['base_bytes'] / mb:,.0f} MiB | {r['start_rss'] / mb:,.0f} MiB | {r['train_peak'] / mb:,.0f} MiB | "
            f"{r['init_peak'] / mb:,.0f} MiB | {r['seconds_per_step']:.2f} |"
        )
    print(f"\n(the imports alone: {rows[0]['imports_rss'] / mb:,.0f} MiB resident; {rows[0]['parameters']:,} parameters)")


if __name__ == "__main__":
    main()

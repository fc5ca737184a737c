"""MaskLearner: step time and memory against plain finetuning, and learned vs dataless masks on the demo.

    python benchmarks/bench_mask.py steps [--device cpu] [--batch 32] [--seq 128] [--steps 10]
    python benchmarks/bench_mask.py demo [--epochs 40]

``steps``: a MiniLM-sized BERT (6 layers, hidden 384, 22.7M parameters, random
init: the architecture of all-MiniLM-L6-v2) as a sequence classifier. Times one
training step (forward, backward, optimizer step) of a plain AdamW finetune of
every parameter, and of ``MaskLearner`` (forward at ``θ_pre + σ(S)⊙τ``, backward to
``S`` only, Adam on ``S``), same batch; each in its own process, with its peak
memory (RSS on CPU, ``max_memory_allocated`` on CUDA).

``demo``: the demo's pretrained base, each demo task finetuned with SGD (the
demo's recipe) and with AdamW; test accuracy of the dataless 1% mask, of the
learned 1% mask (default ``topk`` recipe, best validation epoch kept) and of the
paper's recipe, with the final mask density of each. Masks learn on 64 training
examples per class and validate on the task's validation split.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import lightning.pytorch as pl
import torch
from transformers import BertConfig, BertForSequenceClassification

from skillbank import LearnerSpec, LocalizationSpec, MaskLearner, Stitcher, localize_dataless, task_vector
from skillbank.localization.fewshot import balanced_indices
from skillbank.stitching.heads import accuracy


def minilm_like(device: str) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)
    return BertForSequenceClassification(config).to(device)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_steps(mode: str, device: str, batch: int, seq: int, steps: int) -> dict[str, float]:
    """Median seconds per step of ``mode`` ("finetune" or "mask") and the process's peak memory."""
    model = minilm_like(device)
    generator = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1000, 20000, (batch, seq), generator=generator).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch,), generator=generator).to(device),
    }
    if mode == "finetune":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        base = {k: v.detach().clone() for k, v in model.bert.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        learner = MaskLearner(model, base, spec={"sparsity": 0.01}).to(device)
        del base
        optimizer = learner.configure_optimizers()

        def step() -> None:
            loss = learner(data)[0] + learner.regularizer()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times[2:]), "peak_bytes": peak_bytes(device)}


def steps_report(args: argparse.Namespace) -> None:
    results = {}
    for mode in ("finetune", "mask"):
        out = subprocess.run(
            [sys.executable, __file__, "_child", mode, args.device, str(args.batch), str(args.seq), str(args.steps)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    ratio = results["mask"]["median_s"] / results["finetune"]["median_s"]
    print(
        f"device {args.device}, batch {args.batch} x {args.seq} tokens, MiniLM-sized (22.7M params), median of {args.steps} steps"
    )
    for mode, r in results.items():
        print(f"  {mode:<9} {r['median_s'] * 1000:8.1f} ms/step   peak {r['peak_bytes'] / 2**20:8.0f} MiB")
    print(f"  mask / finetune step time: {ratio:.2f}x")


def demo_report(args: argparse.Namespace) -> None:
    from skillbank.testbed.demo import demo_classifier, finetune_demo_task, pretrained_base, quiet
    from skillbank.testbed.synthetic import DEMO_TASKS, make_splits

    quiet()
    base = pretrained_base()
    print(f"{'finetune':<9}{'task':<11}{'finetuned':>10}{'dataless':>10}{'learned':>9}{'paper':>8}{'paper density':>15}")
    finetunes = []  # all finetunes first, in the demo's order, so the SGD ones are the demo's own
    for optimizer, lr in (("sgd", 0.01), ("adamw", 1e-3)):
        for i, task in enumerate(DEMO_TASKS):
            finetunes.append((optimizer, i, task, *finetune_demo_task(base, task, 500, seed=i, lr=lr, optimizer=optimizer)))
    for optimizer, i, task, finetuned, test in finetunes:
        train_loader, val_loader, _ = make_splits(task, seed=i)
        train = train_loader.dataset
        few = torch.utils.data.Subset(train, balanced_indices(train.labels, 64, seed=0))

        def stitched_accuracy(skill) -> float:  # noqa: ANN001
            stitcher = Stitcher(demo_classifier(base, task.num_labels).eval(), base)
            stitcher.add(skill)
            with stitcher.use_head(skill.metadata.name) as model:
                return accuracy(model, test)

        row = {"finetuned": accuracy(finetuned, test)}
        row["dataless"] = stitched_accuracy(localize_dataless(task_vector(base, finetuned), 0.01, name=task.name))
        for recipe in ("topk", "paper"):
            spec = LocalizationSpec(method="learned", sparsity=0.01, learner=LearnerSpec(recipe=recipe))
            learner = MaskLearner(copy.deepcopy(finetuned), base, spec=spec, skill_name=task.name)
            loader = torch.utils.data.DataLoader(few, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
            epochs = args.epochs if recipe == "topk" else learner.recipe.epochs
            pl.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            ).fit(learner, loader, val_loader)
            row[recipe] = stitched_accuracy(learner.skill)
            row[f"{recipe}_density"] = learner.skill.num_entries / learner.tau.numel()
        print(
            f"{optimizer:<9}{task.name:<11}{row['finetuned']:>10.3f}{row['dataless']:>10.3f}{row['topk']:>9.3f}"
            f"{row['paper']:>8.3f}{row['paper_density']:>15.4f}",
            flush=True,
        )


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        mode, device, batch, seq, steps = sys.argv[2:7]
        print(json.dumps(time_steps(mode, device, int(batch), int(seq), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("steps", help="step time and peak memory, MaskLearner vs finetuning")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(run=steps_report)
    p = sub.add_parser("demo", help="learned vs dataless masks on the demo tasks")
    p.add_argument("--epochs", type=int, default=40)
    p.set_defaults(run=demo_report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

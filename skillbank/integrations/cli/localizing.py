"""``skillbank localize`` and ``route``: a finetune's skill into a bank, and which skill a text would be routed to."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli.common import (
    escape,
    progress,
    regex_arg,
    skill_list_arg,
    sparsity_or_auto_arg,
    table,
)
from skillbank.storage.bank import SkillBank
from skillbank.storage.format import VALUE_FORMATS

__all__ = ["register"]


def register(sub: Any) -> None:  # argparse's subparsers action
    """Add ``localize`` and ``route``."""
    p = sub.add_parser(
        "localize",
        help="localize a finetuned model's skill and add it to a bank",
        description="Compute the task vector of --finetuned against --base, find its mask with --method (dataless: "
        "the top ceil(s*P) entries of |tau| over all shared parameters; learned: trained on --few-shot examples), "
        "and add the skill (plus the finetuned model's own head) to --bank; SkillHarvester takes the same path. Models are Hugging Face folders (save_pretrained) or "
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
        "--method",
        choices=_method_names(),
        default="dataless",
        help="how the mask is found (default: dataless). " + _method_help(),
    )
    p.add_argument(
        "--few-shot",
        default=None,
        metavar="FILE",
        help='with --method learned: the labelled examples the mask is learned on, one JSON object a line: {"text": ..., '
        '"label": 0} (64 a class in the paper), in order, 32 a batch; tokenized with the finetuned folder\'s tokenizer',
    )
    p.add_argument(
        "--sparsity",
        type=sparsity_or_auto_arg,
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
    p.add_argument(
        "--low-rank",
        type=int,
        default=0,
        metavar="R",
        help="also keep each weight matrix's top R singular directions of tau as a low-rank part, the sparse mask "
        "taken from what they leave (default: 0, none; dataless only). Such a skill is stitched matrix by matrix "
        "(stitch --rule tsv_m, iso_c or iso_cts), not by the per-entry overlap rules",
    )
    p.add_argument(
        "--keep-examples",
        type=int,
        default=0,
        metavar="N",
        help="keep N tokenized examples a class in the skill file (default: 0, none), from --examples-data, else "
        "--few-shot, else --val-data: a calibration set with which a composition of several skills can weigh them "
        "later; skillbank drop-examples deletes them. Needs --finetuned to be a model folder (its tokenizer).",
    )
    p.add_argument(
        "--examples-data",
        default=None,
        metavar="FILE",
        help="with --keep-examples: the labelled texts to keep examples of (same JSON-lines format)",
    )
    p.add_argument("--max-centroids", type=int, default=16, help="with routing data: centroids kept, one per label (default: 16)")
    p.add_argument("--max-length", type=int, default=128, help="with --val-data/--routing-data: tokens per text (default: 128)")
    p.add_argument(
        "--value-dtype",
        choices=VALUE_FORMATS,
        default="float32",
        help="how the task-vector values are stored (default: float32; bfloat16 halves them; 1bit, 2bit and 4bit "
        "code each value as a sign and a magnitude level, with positions coded near their entropy: about 1 bit "
        "per model parameter at 14%% of the entries)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        type=regex_arg,
        help="never select parameters whose name matches (repeatable), e.g. --exclude embeddings",
    )
    p.add_argument(
        "--head-pattern",
        action="append",
        default=[],
        metavar="REGEX",
        type=regex_arg,
        help="treat shared parameters matching this as the task head (repeatable)",
    )
    p.set_defaults(run=_localize)

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
    p.add_argument("--skills", type=skill_list_arg, help="comma-separated skill names to choose among (default: every skill)")
    p.add_argument("--top", type=int, default=5, help="scores shown per text (default: 5)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    p.set_defaults(run=_route)


def _localize(args: argparse.Namespace) -> int:
    import functools
    from dataclasses import replace

    from skillbank.localization.finetune import localize_finetune
    from skillbank.localization.spec import LocalizationSpec
    from skillbank.vectors.models import load_tokenizer

    bank = SkillBank(args.bank)  # fail fast on a bad bank path before the heavy work
    if args.name in bank and not args.replace:
        raise SkillbankError(
            f"a skill named {args.name!r} is already in {bank.path}; pick another --name, or --replace it with this one."
        )
    if args.replace and args.name not in bank:
        raise SkillbankError(f"--replace: there is no skill named {args.name!r} in {bank.path} to replace; drop --replace.")
    examples_data = args.examples_data or args.few_shot or args.val_data
    if args.keep_examples < 0 or (args.keep_examples and not examples_data):
        raise SkillbankError(
            "--keep-examples N needs N >= 0 and labelled texts to take them from: --examples-data FILE "
            '(JSON lines of {"text": ..., "label": ...}), --few-shot or --val-data.'
        )
    if args.keep_examples and not (Path(args.finetuned) / "config.json").is_file():
        raise SkillbankError("--keep-examples needs --finetuned to be a Hugging Face model folder (with its tokenizer).")
    spec = LocalizationSpec(
        method=args.method,
        sparsity=args.sparsity,
        target_recovery=args.target_recovery,
        exclude=args.exclude,
        head_patterns=args.head_pattern,
        value_dtype=args.value_dtype,
        routing_centroids=args.max_centroids,
        low_rank=args.low_rank,
    )
    tokenizer = functools.cache(lambda: load_tokenizer(args.finetuned, args.base))  # read once, where needed
    with progress(total=2, desc=f"localize {args.name}", unit="step") as bar:
        bar.set_postfix_str(f"{spec.method}, sizes keeping {args.target_recovery:g}" if spec.auto else spec.method)
        base, finetuned, inputs = _inputs(args, spec, tokenizer)
        skill = localize_finetune(
            base,
            finetuned,
            spec,
            name=args.name,
            task=args.task,
            inputs=inputs,
            source={"kind": "full finetune", "base": args.given["base"], "finetuned": args.given["finetuned"]},
        )
        if args.keep_examples:
            skill = replace(skill, examples=_kept_examples(args, examples_data, tokenizer))
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
    if skill.low_rank:
        ranks = sorted({part.rank for part in skill.low_rank.values()})
        print(
            f"low-rank parts: {len(skill.low_rank)} matrices, rank {'/'.join(map(str, ranks))}, "
            f"{skill.num_low_rank:,} values (stitch them with --rule tsv_m, iso_c or iso_cts)"
        )
    if skill.examples is not None:
        print(f"examples: {skill.examples.summary()} kept (skillbank drop-examples deletes them)")
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


def _inputs(args: argparse.Namespace, spec: Any, tokenizer: Callable[[], Any]) -> tuple[Any, Any, Any]:  # -> base, ft, inputs
    """What to localize from and with. A dataless mask of a fixed size: the two paths (it streams from them). Else the
    weights read once, the base and the finetuned folder's model, shared by the task vector, the auto search's probe
    (a copy of the model with the base written in) and the learner; --val-data (auto sizes) and --few-shot (learned
    masks) tokenized with the folder's tokenizer (``tokenizer()``). Routing data (--routing-data, else --val-data when
    the base is a model folder, whose encoder gives the features) in any case."""
    from skillbank.localization.methods import LocalizationInputs

    routing_data = args.routing_data or (args.val_data if (Path(args.base) / "config.json").is_file() else None)
    if not spec.auto and spec.method == "dataless":
        base, finetuned, inputs = args.base, args.finetuned, LocalizationInputs(base=args.base)
    else:
        base, finetuned, inputs = _loaded_inputs(args, spec, tokenizer)
    if routing_data:
        from skillbank.integrations.labelled_text import read_jsonl, task_loader
        from skillbank.vectors.models import load_encoder

        inputs.routing = task_loader(read_jsonl(routing_data), tokenizer(), max_length=args.max_length, batch_size=64)
        inputs.encoder = lambda: load_encoder(args.base)
    return base, finetuned, inputs


def _loaded_inputs(args: argparse.Namespace, spec: Any, tokenizer: Callable[[], Any]) -> tuple[Any, Any, Any]:
    """The base's weights, the finetuned folder's model and what an auto size or a learned mask needs, read once
    (``tokenizer()`` gives the finetuned folder's tokenizer, after the arguments are checked)."""
    import copy

    from skillbank.integrations.labelled_text import read_jsonl, task_loader
    from skillbank.localization.methods import LocalizationInputs
    from skillbank.vectors.models import apply_delta, load_model
    from skillbank.vectors.weights import load_weights

    if spec.auto and not args.val_data:
        raise SkillbankError(
            '--sparsity auto needs --val-data FILE (JSON lines of {"text": ..., "label": ...}) '
            "to measure what each mask size keeps; or give a number, e.g. --sparsity 0.05."
        )
    if spec.method == "learned" and not args.few_shot:
        raise SkillbankError(
            '--method learned needs --few-shot FILE (JSON lines of {"text": ..., "label": ...}; the paper uses 64 a class).'
        )
    folder = Path(args.finetuned)
    if not (folder / "config.json").is_file():
        raise SkillbankError(
            "--sparsity auto and --method learned need --finetuned to be a Hugging Face classifier folder (with its tokenizer)."
        )
    model: Any = load_model(str(folder))  # a transformers classifier
    base = load_weights(args.base)
    inputs = LocalizationInputs(base=base)

    def batches(file: str, batch_size: int) -> list[Any]:
        split = read_jsonl(file, model.config.num_labels)
        return list(task_loader(split, tokenizer(), max_length=args.max_length, batch_size=batch_size))

    if spec.auto:
        inputs.validation = batches(args.val_data, 64)
        inputs.probe = lambda: apply_delta(copy.deepcopy(model).eval(), base, {})  # the base with the finetune's head
    if spec.method == "learned":
        inputs.model, inputs.few_shot = model, batches(args.few_shot, 32)
    return base, model, inputs


def _kept_examples(args: argparse.Namespace, file: str, tokenizer: Callable[[], Any]) -> Any:  # -> Examples
    """--keep-examples a class of ``file``, tokenized with the finetuned folder's tokenizer (seed 0)."""
    from skillbank.integrations.labelled_text import read_jsonl, task_loader
    from skillbank.localization.fewshot import examples_from_batches

    batches = task_loader(read_jsonl(file), tokenizer(), max_length=args.max_length, batch_size=64)
    return examples_from_batches(batches, args.keep_examples, pad_token_id=tokenizer().pad_token_id or 0)


def _method_names() -> list[str]:
    from skillbank.localization.methods import METHODS

    return sorted(METHODS)


def _method_help() -> str:
    from skillbank.localization.methods import METHODS

    return "; ".join(f"{name}: {METHODS[name].summary}" for name in sorted(METHODS))


def _route(args: argparse.Namespace) -> int:
    import torch

    from skillbank.stitching.routing import SkillRouter, mean_pooled_features
    from skillbank.vectors.models import load_encoder, load_tokenizer

    bank = SkillBank(args.bank, create=False)
    names = args.skills if args.skills is not None else bank.names()
    encoder = load_encoder(args.base)
    router = SkillRouter([bank.get(n) for n in names], width=encoder.config.hidden_size)
    batch = load_tokenizer(args.base)(
        list(args.text), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        scores = router.scores(mean_pooled_features(encoder, batch))
    for text, row in zip(args.text, scores):
        order = row.argsort(descending=True).tolist()
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{escape(shown)!s} -> {router.names[order[0]]}")
        print(table(("skill", "cosine"), [(router.names[i], float(row[i])) for i in order[: args.top]]))
        print()
    return 0

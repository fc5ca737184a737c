"""Write a stitched model to disk as a Hugging Face folder, heads and model card beside it."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from skillbank.errors import SkillbankError
from skillbank.stitching.overlap import OverlapRule, get_rule
from skillbank.stitching.spectral_stitcher import SpectralStitcher
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank, check_skill_name
from skillbank.storage.skill import Skill
from skillbank.vectors.models import load_base_model, load_classifier, model_path
from skillbank.vectors.spectral import MATRIX_MERGES

__all__ = ["export_skill", "stitch_to_folder"]


def _model_card(bank: SkillBank, stitcher: Stitcher | SpectralStitcher, base: str | Path, rule: str) -> str:
    names = stitcher.stitched
    lines = [
        "---",
        "library_name: transformers",
        "tags: [skillbank, localize-and-stitch, model-merging]",
        "---",
        "",
        "# Stitched model",
        "",
        f"Base model `{base}` with {len(names)} skills from the skillbank bank `{bank.path}` stitched on:",
        *_composition(stitcher, rule),
        "",
        "| skill | task | method | sparsity | entries | source |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        e = bank.entry(name)
        lines.append(
            f"| {_md(e.name)} | {_md(e.task)} | {_md(e.method)} | {e.sparsity:g} | {e.entries:,} | "
            f"{_md(_source(stitcher.metadata[name].source))} |"
        )
    lines += ["", "Each skill's task head is in `heads/<skill>.safetensors`, named as in its finetuned model.", ""]
    with_head = next((name for name in names if stitcher.heads.get(name)), None)  # a checked name: letters, digits, -_.
    if with_head is not None:
        labels = _labels_of(stitcher.heads[with_head])
        lines += [
            "The model loads without its task heads (transformers reports the classifier as newly initialized);",
            f"to answer as skill `{with_head}` with plain transformers and safetensors, put its head back:",
            "",
            "```python",
            "from safetensors.torch import load_file",
            "from transformers import AutoModelForSequenceClassification",
            "",
            'folder = "path/to/this/folder"',
            f"model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels={labels or 'N'})",
            f'model.load_state_dict(load_file(f"{{folder}}/heads/{with_head}.safetensors"), strict=False)  # the head only',
            "```",
            "",
        ]
    return "\n".join(lines)


def _md(text: object) -> str:
    """``text`` safe inside a markdown table cell or sentence: one line, markdown and HTML characters escaped."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))[:500]
    return flat.translate(_MD_ESCAPES)


_MD_ESCAPES = str.maketrans({c: f"\\{c}" for c in "\\`*_{}[]()#+!|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})


def _source(source: dict) -> str:
    """Where a skill came from, in a few words (its metadata's ``source``)."""
    kind = source.get("kind", "unrecorded")
    if kind == "lora adapter":
        config = source.get("adapter_config", {})
        return f"LoRA adapter (r={config.get('r')}, {source.get('adapter_folder') or source.get('origin', '')})"
    return f"{kind} ({source['finetuned']})" if "finetuned" in source else kind


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise SkillbankError(f"--out {out} already exists and is not an empty directory; pick a new folder.")


@contextmanager
def _building(out: Path) -> Iterator[Path]:
    """A fresh sibling folder to build ``out`` in, renamed onto ``out`` when the block succeeds and removed otherwise.

    The rename is atomic and exclusive: it succeeds only while ``out`` is missing
    or an empty folder, so two runs into one folder never mix, and a killed run
    leaves a ``.<out>.partial-…`` sibling, never an ``out`` that loads as complete.
    """
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise SkillbankError(
                    f"--out {out} was filled by another run while this one worked; nothing of this "
                    "run was kept. Pick a new folder."
                ) from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stitch_to_folder(
    base: str | Path,
    bank: SkillBank,
    names: Sequence[str],
    out: str | Path,
    progress: Callable[[Iterable[str]], Iterable[str]] = lambda it: it,
    rule: str | OverlapRule = "mean",
    scale: float = 1.0,
    calibrate: str | None = None,
) -> Path:
    """Stitch ``names`` from ``bank`` onto ``base`` and write the result to ``out``.

    ``base`` is a ``save_pretrained`` folder (``out`` is then a folder that
    ``AutoModel.from_pretrained`` loads) or a ``.safetensors`` file (``out``
    then holds ``model.safetensors``). Every name is checked before anything
    is written. ``rule`` combines overlapping skills (see :mod:`skillbank.stitching.overlap`), or names a
    spectral composition of each weight matrix (``"tsv_m"``, ``"iso_c"``, ``"iso_cts"``: a
    :class:`~skillbank.stitching.spectral_stitcher.SpectralStitcher` at ``scale``); it is recorded in the model card.
    ``calibrate`` (a loss of :mod:`skillbank.stitching.calibration`, with ``rule="tsv_m"`` and a base folder) weighs
    each skill's part per layer on the examples the skills keep, after every skill is stitched; the weights go into
    the model card.
    """
    spectral = isinstance(rule, str) and rule in MATRIX_MERGES
    rule = rule if spectral else get_rule(rule).name
    assert isinstance(rule, str)
    out = Path(out)
    _check_out(out)
    if not names:
        raise SkillbankError(f"no skills to stitch: {bank.path} is empty.")
    if len(set(names)) != len(names):
        raise SkillbankError(f"skill names repeat in {list(names)}.")
    for name in names:
        bank.entry(name)
    base_path = model_path(base)
    if calibrate is not None and (rule != "tsv_m" or not base_path.is_dir()):
        raise SkillbankError("calibration weighs the parts of a TSV-M composition: rule 'tsv_m' and a base model folder.")
    live: Any = None  # what the stitcher writes into: the model, or a classifier around it to calibrate through heads
    if calibrate is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the new head is meant to be new: each skill's own replaces it while it runs
        live = load_classifier(base_path).eval()
        model: Any = live.base_model
    elif base_path.is_dir():
        model = load_base_model(base_path)  # a transformers model (else, below, a flat state dict)
    else:
        model = load_file(str(base_path))
    check = base_path if base_path.is_dir() else None
    stitcher: Stitcher | SpectralStitcher = (
        SpectralStitcher(live if live is not None else model, check, bank=bank, merge=rule, scale=scale)
        if spectral
        else Stitcher(model, check, bank=bank, rule=rule)
    )
    for name in progress(names):
        stitcher.add(name)
    if calibrate is not None:
        assert isinstance(stitcher, SpectralStitcher)
        stitcher.calibrate(loss=calibrate)
    with _building(out) as folder:
        if not isinstance(model, dict):  # a transformers model
            model.save_pretrained(folder)
        else:
            save_file({k: v.contiguous() for k, v in model.items()}, str(folder / "model.safetensors"))
        (folder / "heads").mkdir()
        for name, head in stitcher.heads.items():
            if head:
                target = folder / "heads" / f"{check_skill_name(name)}.safetensors"  # no separators: stays in heads/
                save_file({k: v.contiguous().clone() for k, v in head.items()}, str(target))
        (folder / "README.md").write_text(_model_card(bank, stitcher, base, rule))
    return out


def _composition(stitcher: Stitcher | SpectralStitcher, rule: str) -> list[str]:
    """The model card's lines on how the skills were combined."""
    if isinstance(stitcher, SpectralStitcher):
        merge = MATRIX_MERGES[stitcher.merge]
        lines = [
            "θ = θ_pre + s · merge(τ_i) in each weight matrix, the mean of the skills covering each entry elsewhere.",
            "",
            f"Composition: `{merge.name}` — {merge.summary}; scale s = {stitcher.scale:g}.",
        ]
        if merge.flattens:
            lines += ["", "A weight matrix only one skill touches holds that skill's own τ, unscaled."]
        record = stitcher.calibration
        if record is not None:
            lines += [
                "",
                f"Calibrated: each skill's part of each layer weighted, learned on the skills' kept examples (loss "
                f"`{record.loss}`, {record.steps} Adam steps, loss {record.losses[0]:.4g} → {record.losses[-1]:.4g}):",
                "",
                "| skill | " + " | ".join(_md(g) for g in record.groups) + " |",
                "| --- |" + " --- |" * len(record.groups),
                *(f"| {_md(n)} | " + " | ".join(f"{w:.3f}" for w in ws) + " |" for n, ws in record.weights.items()),
            ]
        return lines
    return [
        "θ = θ_pre + Σ_i γ'_i ⊙ τ_i, where skills overlap combined by the overlap rule below.",
        "",
        f"Overlap rule: `{rule}` — {get_rule(rule).summary}.",
    ]


def _labels_of(head: dict) -> int | None:
    for name, tensor in head.items():
        if name.endswith(("classifier.weight", "score.weight", "out_proj.weight")) and tensor.dim() == 2:
            return int(tensor.shape[0])
    return None


def export_skill(base: str | Path, bank: SkillBank, name: str, out: str | Path) -> Path:
    """Write skill ``name`` as a dense single-task model: ``θ_pre + γ ⊙ τ`` (plus its low-rank parts) with the
    skill's head, in a folder ``AutoModelForSequenceClassification.from_pretrained`` (or the base's own class) loads
    without skillbank.

    ``base`` is the base model's ``save_pretrained`` folder (or ``pulled:<alias>``).
    """

    from skillbank.vectors.weights import align_names

    out = Path(out)
    _check_out(out)
    skill = bank.get(name)
    base_path = model_path(base)
    if not base_path.is_dir():
        raise SkillbankError(f"--base {base} is not a model folder; export needs the base's save_pretrained folder.")
    labels = _labels_of(skill.head)
    model: Any = load_classifier(base_path, labels).eval() if labels is not None else load_base_model(base_path)
    # a skill with low-rank parts is composed matrix by matrix; alone, TSV-M gives back its own τ exactly
    alone = SpectralStitcher(model, base_path, bank=bank) if skill.low_rank else Stitcher(model, base_path, bank=bank)
    alone.add(skill)
    params = dict(model.state_dict(keep_vars=True))
    names = align_names(skill.head, params)
    missing = sorted(set(skill.head) - set(names))
    if missing:
        raise SkillbankError(f"the base's architecture has no tensor for head entries {missing[:3]}.")
    with torch.no_grad():
        for src, dst in names.items():
            if params[dst].shape != skill.head[src].shape:
                raise SkillbankError(
                    f"head tensor {src!r} {tuple(skill.head[src].shape)} does not fit {dst!r} {tuple(params[dst].shape)}."
                )
            params[dst].copy_(skill.head[src])
    with _building(out) as folder:
        model.save_pretrained(folder)
        (folder / "README.md").write_text(_export_card(base, bank, skill))
    return out


def _export_card(base: str | Path, bank: SkillBank, skill: Skill) -> str:
    meta = skill.metadata
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [skillbank, localize-and-stitch]",
            "---",
            "",
            f"# {_md(meta.name)}: a single-task model exported from skillbank",
            "",
            f"Base {_md(base)} plus the skill {_md(meta.name)} (task {_md(meta.task)}, {_md(meta.method)} mask, "
            f"{skill.num_entries:,} of {skill.num_shared:,} entries = {skill.num_entries / skill.num_shared:.2%}) "
            f"and its own head, from the bank {_md(bank.path)}. Source: {_md(_source(meta.source))}.",
            "",
        ]
    )

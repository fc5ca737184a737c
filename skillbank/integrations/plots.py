"""Plots of a bank's skills (matplotlib, PNG): mask overlap, where masks live, sparsity vs recovery, arrivals.

The numbers behind each plot come from pure functions (:func:`jaccard`,
:func:`placement`, :func:`~skillbank.comparison.arrivals.arrival_metrics`), so they can be
tested and printed without matplotlib.

>>> component("bert.encoder.layer.3.attention.self.query.weight"), layer_of("bert.encoder.layer.3.output.dense.weight")
('attention', 'layer 3')
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from skillbank.comparison.arrivals import arrival_metrics
from skillbank.errors import SkillbankError
from skillbank.storage.bank import SkillBank
from skillbank.storage.durable import check_output_path, write_output
from skillbank.storage.skill import Skill

__all__ = [
    "COMPONENTS",
    "component",
    "jaccard",
    "layer_of",
    "placement",
    "plot_arrivals",
    "plot_layers",
    "plot_overlap",
    "plot_recovery",
]

#: Parameter groups of a transformer, in plotting order.
COMPONENTS = ("embeddings", "attention", "FFN", "LayerNorm", "bias", "other")

_LAYER = re.compile(r"(?:layer|layers|h|block|blocks)\.(\d+)\.")


def component(name: str) -> str:
    """The group of a parameter name: embeddings, attention, FFN, LayerNorm, bias or other (e.g. pooler)."""
    lowered = name.lower()
    if "layernorm" in lowered or "layer_norm" in lowered or re.search(r"(^|\.)ln_?\w*\.", lowered):
        return "LayerNorm"
    if lowered.endswith("bias"):
        return "bias"
    if "embed" in lowered:
        return "embeddings"
    if "attention" in lowered or "attn" in lowered:
        return "attention"
    if "intermediate" in lowered or ".output." in lowered or "mlp" in lowered or "ffn" in lowered:
        return "FFN"
    return "other"


def layer_of(name: str) -> str:
    """``"layer N"`` for a block's parameter, ``"embeddings"`` or ``"other"`` otherwise."""
    match = _LAYER.search(name)
    if match:
        return f"layer {int(match.group(1))}"
    return "embeddings" if "embed" in name.lower() else "other"


def _flat_positions(skills: Sequence[Skill]) -> list[Tensor]:
    """Each skill's mask as ascending positions in one flat space over the first skill's parameters.

    Memory follows the masks, not the parameters their headers declare.
    """
    shapes = skills[0].metadata.shapes
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    positions = []
    for skill in skills:
        if skill.metadata.shapes != shapes:
            raise SkillbankError(
                f"skill {skill.name!r} covers other parameters than {skills[0].name!r}; compare skills of one base."
            )
        parts = [offsets[name] + region.indices.to(torch.int64) for name, region in skill.regions.items() if len(region)]
        positions.append(torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.int64, device="cpu"))
    return positions


def jaccard(skills: Sequence[Skill]) -> Tensor:
    """Pairwise ``|A ∩ B| / |A ∪ B|`` of the skills' masks (a symmetric matrix, 1 on the diagonal)."""
    positions = _flat_positions(skills)
    n = len(positions)
    out = torch.ones(n, n, dtype=torch.float64, device="cpu")
    for i in range(n):
        for j in range(i + 1, n):
            shared = int(torch.isin(positions[i], positions[j], assume_unique=True).sum())
            union = positions[i].numel() + positions[j].numel() - shared
            out[i, j] = out[j, i] = shared / union if union else 1.0
    return out


def placement(skill: Skill) -> dict[tuple[str, str], int]:
    """How many of the skill's entries fall in each ``(layer, component)``."""
    counts: dict[tuple[str, str], int] = {}
    for name, region in skill.regions.items():
        if len(region):
            key = (layer_of(name), component(name))
            counts[key] = counts.get(key, 0) + len(region)
    return counts


#: A bank (or its folder) whose skills ``names`` are plotted, or the skills themselves, already loaded (all plotted).
Skills = Union[SkillBank, str, Path, Sequence[Skill]]


def _load(bank: Skills, names: Sequence[str] | None) -> list[Skill]:
    if not isinstance(bank, (SkillBank, str, Path)):
        if not bank:
            raise SkillbankError("no skills to plot.")
        return list(bank)
    bank = bank if isinstance(bank, SkillBank) else SkillBank(bank, create=False)
    names = list(names) if names else bank.names()
    if not names:
        raise SkillbankError(f"{bank.path} holds no skills to plot.")
    return [bank.get(n) for n in names]


def _save(plt: Any, fig: Any, out: str | Path) -> None:
    """Write ``fig`` as a PNG to ``out`` (and close it), atomically and only over a regular file
    (:func:`~skillbank.storage.durable.write_output`)."""
    import io

    try:
        check_output_path(Path(out))  # before drawing: a wrong --out costs nothing
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        write_output(Path(out), buffer.getvalue())
    finally:
        plt.close(fig)


def _number(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _json_file(path: str | Path, what: str) -> Any:
    """The JSON in ``path``, or a clear error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SkillbankError(f"the {what} file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SkillbankError(f"the {what} file {path} is not readable JSON ({str(exc)[:120]}).") from None


def _pyplot() -> Any:  # matplotlib.pyplot, imported on first use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overlap(bank: Skills, out: str | Path, names: Sequence[str] | None = None) -> Tensor:
    """Heatmap of the pairwise Jaccard overlap of the skills' masks; returns the matrix."""
    skills = _load(bank, names)
    matrix = jaccard(skills)
    plt = _pyplot()
    labels = [s.name for s in skills]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 1.0 + 0.8 * len(labels)))
    im = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")  # one fixed scale: 1 is the diagonal, 0 no overlap
    for i in range(len(labels)):
        for j in range(len(labels)):
            value = float(matrix[i, j])
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="k" if value > 0.6 else "w", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title("mask overlap (Jaccard)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(plt, fig, out)
    return matrix


def _layer_order(key: str) -> tuple[int, int]:
    if key == "embeddings":
        return (0, 0)
    if key.startswith("layer "):
        return (1, int(key.split()[1]))
    return (2, 0)


def plot_layers(bank: Skills, out: str | Path, names: Sequence[str] | None = None) -> dict[str, dict]:
    """One panel per skill: the share of its entries in each layer × component; returns the shares."""
    skills = _load(bank, names)
    counts = {s.name: placement(s) for s in skills}
    layers = sorted({k[0] for c in counts.values() for k in c} | {"embeddings"}, key=_layer_order)
    plt = _pyplot()
    cols = min(3, len(skills))
    rows = -(-len(skills) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * len(layers) * rows + 1.2), squeeze=False)
    shares = {}
    for ax, skill in zip(axes.flat, skills):
        total = max(sum(counts[skill.name].values()), 1)
        grid = torch.tensor([[counts[skill.name].get((l, c), 0) / total for c in COMPONENTS] for l in layers], device="cpu")
        shares[skill.name] = {
            f"{l} / {c}": float(grid[i, j]) for i, l in enumerate(layers) for j, c in enumerate(COMPONENTS) if grid[i, j]
        }
        im = ax.imshow(grid.numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
        for i, j in torch.nonzero(grid >= 0.005).tolist():  # the share written in every cell that holds any
            ax.text(
                j, i, f"{float(grid[i, j]):.0%}", ha="center", va="center", fontsize=7, color="k" if grid[i, j] > 0.6 else "w"
            )
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of entries")
        ax.set_xticks(range(len(COMPONENTS)), COMPONENTS, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_title(f"{skill.name}: share of its {total:,} entries", fontsize=9)
    for ax in list(axes.flat)[len(skills) :]:
        ax.axis("off")
    fig.tight_layout()
    _save(plt, fig, out)
    return shares


def plot_recovery(curve: str | Path | Mapping[str, Mapping[str, float]], out: str | Path) -> dict[str, dict[float, float]]:
    """Mean recovery (skill alone / finetuned accuracy) against sparsity, one line per method.

    ``curve`` maps ``"<method> <sparsity>"`` to ``{task: recovery}`` (other keys are
    ignored), or is a JSON file of that (``benchmarks/bench_real.py`` writes one).
    Means are over the tasks every point has, so methods are compared on the
    same tasks. Returns ``{method: {sparsity: mean recovery}}``.
    """
    data = _json_file(curve, "recovery") if isinstance(curve, (str, Path)) else curve
    if not isinstance(data, Mapping):
        raise SkillbankError("the recovery data must map '<method> <sparsity>' to {task: recovery}.")
    points: dict[tuple[str, float], Mapping[str, float]] = {}
    for key, per_task in data.items():
        method, _, value = str(key).rpartition(" ")
        sparsity = _number(value)
        if (
            method
            and sparsity is not None
            and isinstance(per_task, Mapping)
            and per_task
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in per_task.values())
        ):
            points[(method, sparsity)] = per_task
    if not points:
        raise SkillbankError("no '<method> <sparsity>' entries to plot in the recovery data.")
    tasks = sorted(set.intersection(*(set(p) for p in points.values())))
    if not tasks:
        raise SkillbankError("the recovery points share no task; evaluate the same tasks at every sparsity.")
    lines: dict[str, dict[float, float]] = {}
    for (method, sparsity), per_task in points.items():
        lines.setdefault(method, {})[sparsity] = sum(per_task[t] for t in tasks) / len(tasks)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, by_sparsity in sorted(lines.items()):
        xs = sorted(by_sparsity)
        ax.plot([100 * x for x in xs], [by_sparsity[x] for x in xs], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("entries kept (% of parameters)")
    ax.set_ylabel("recovery (skill alone / finetuned)")
    ax.set_title(f"mean over {', '.join(tasks)}", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(plt, fig, out)
    return lines


def plot_arrivals(runs: str | Path | Mapping, out: str | Path) -> dict[str, dict[str, list[float]]]:
    """Average normalized accuracy and backward transfer after each arrival, one line per method.

    ``runs`` is ``{"order": [task, …], "finetuned": {task: accuracy}, "methods": {method:
    [{task: accuracy} after each arrival]}}``, or a JSON file of that
    (``benchmarks/bench_real.py`` writes ``arrivals.json``). Returns each method's
    :func:`~skillbank.comparison.arrivals.arrival_metrics`.
    """
    data = _json_file(runs, "arrivals") if isinstance(runs, (str, Path)) else runs
    if not isinstance(data, Mapping) or not all(isinstance(data.get(k), (list, dict)) for k in ("order", "finetuned", "methods")):
        raise SkillbankError("arrival data needs 'order', 'finetuned' and 'methods' (method -> accuracies after each arrival).")
    metrics = {m: arrival_metrics(accs, data["order"], data["finetuned"]) for m, accs in data["methods"].items()}
    if not metrics:
        raise SkillbankError("no methods to plot in the arrival data.")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, m in sorted(metrics.items()):
        steps = range(1, len(m["average"]) + 1)
        left.plot(steps, m["average"], marker="o", label=method)
        right.plot(list(steps)[1:], m["bwt"][1:], marker="o", label=method)
    left.set_ylabel("average normalized accuracy (tasks seen)")
    right.set_ylabel("backward transfer (normalized)")
    right.axhline(0.0, color="gray", lw=0.8, ls="--")
    for ax in (left, right):
        ax.set_xlabel("tasks arrived")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("arrival order: " + ", ".join(map(str, data["order"])), fontsize=8)
    fig.tight_layout()
    _save(plt, fig, out)
    return metrics

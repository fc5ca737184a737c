"""Task vectors: a finetuned model split against its base into shared deltas and a head."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from skillbank.devices import device_of
from skillbank.errors import TaskVectorError
from skillbank.vectors.adapters import Finetune, merged_finetune
from skillbank.vectors.weights import WeightsSource, align_names, base_fingerprint, drop_aliases, is_float, load_weights

__all__ = [
    "MAX_RELATIVE_NORM",
    "Plausibility",
    "TaskVector",
    "check_finite",
    "matches",
    "nonfinite_error",
    "pair_shared",
    "task_vector",
]

#: ``‖τ‖ / ‖θ_pre‖`` over the weight matrices above which a "finetune" is warned about: finetunes stay far
#: below 1, while two independent initializations (another base) differ by about √2 ≈ 1.41.
MAX_RELATIVE_NORM = 1.2


@dataclass
class TaskVector:
    """``τ = θ_ft − θ_pre`` over the shared parameters, plus the dense head.

    Attributes:
        shared: ``{base name: τ}`` in float32, for every floating-point tensor the
            base and the finetuned model both hold with the same shape.
        head: ``{finetuned name: tensor}``: everything else the finetuned model
            holds (a new classifier, resized embeddings), kept dense.
        base_fingerprint: identifies the base over the shared parameters.
        names: ``{base name: finetuned name}`` for the shared parameters.
        dtypes: ``{base name: dtype}`` of the base's shared parameters (``"torch.float32"``).
        source: where the finetune came from when that is not a plain full finetune
            (a merged LoRA adapter: its kind and config); copied into skills' metadata.
    """

    shared: dict[str, Tensor]
    head: dict[str, Tensor]
    base_fingerprint: str
    names: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shared(self) -> int:
        """How many scalar entries the shared parameters hold (``P``)."""
        return sum(t.numel() for t in self.shared.values())


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches any of the regexes ``patterns``."""
    return any(re.search(p, name) for p in patterns)


def pair_shared(
    base: Mapping[str, list[int]], finetuned: Mapping[str, list[int]], head_patterns: Sequence[str] = ()
) -> dict[str, str]:
    """``{base name: finetuned name}`` of the floating-point tensors both hold with one shape (names aligned
    across a wrapper prefix), leaving out what ``head_patterns`` match; from the shapes alone.

    Raises:
        TaskVectorError: they share none.
    """
    aligned = align_names(base, finetuned)
    shared = {
        b: f
        for b, f in aligned.items()
        if base[b] == finetuned[f] and not matches(b, head_patterns) and not matches(f, head_patterns)
    }
    if not shared:
        differ = [f"{b} {list(base[b])} vs {list(finetuned[f])}" for b, f in aligned.items() if base[b] != finetuned[f]]
        found = (
            f"the names match but the shapes differ: {'; '.join(differ[:3])}"
            if differ
            else f"base has e.g. {sorted(base)[:3]}, finetuned has e.g. {sorted(finetuned)[:3]}"
        )
        raise TaskVectorError(
            f"the base and finetuned models share no floating-point parameter with the same name and shape ({found}); "
            "is this the base the model was finetuned from (the same architecture and size)?"
        )
    return shared


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Raise :class:`TaskVectorError` naming the first tensor of ``tensors`` with NaN/Inf entries."""
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise nonfinite_error(what, name, int(bad.sum()))


def nonfinite_error(what: str, name: str, count: int) -> TaskVectorError:
    """The error for ``count`` NaN/Inf entries in tensor ``name``."""
    return TaskVectorError(
        f"{what} {name!r} has {count} NaN/Inf entries; the finetune diverged "
        "or the checkpoint is damaged. Re-run or pick an earlier checkpoint."
    )


class Plausibility:
    """Whether a task vector looks like a finetune's, gathered one tensor at a time.

    An all-zero τ (the base passed as its own finetune) is an error; a τ as large
    as the weights (``‖τ‖ / ‖θ_pre‖`` over the weight matrices above
    :data:`MAX_RELATIVE_NORM`: another base?) a warning.
    """

    def __init__(self) -> None:
        self.change, self.size, self.nonzero = 0.0, 0.0, False

    def add(self, tau: Tensor, base: Tensor) -> None:
        """Count one shared tensor: its τ and its base value."""
        self.nonzero = self.nonzero or bool(tau.any())
        if tau.dim() >= 2:
            self.change += float(tau.pow(2).sum())
            self.size += float(base.float().pow(2).sum())

    def check(self) -> None:
        """Raise or warn, as the class says."""
        if not self.nonzero:
            raise TaskVectorError(
                "the finetuned weights equal the base's everywhere (the task vector is all zero): pass "
                "the finetuned model (or its checkpoint folder), not the base."
            )
        ratio = (self.change / self.size) ** 0.5 if self.size > 0 else 0.0
        if ratio > MAX_RELATIVE_NORM:
            warnings.warn(
                f"the task vector is as large as the weights themselves (||tau|| / ||theta_pre|| = {ratio:.2f} "
                f"over the weight matrices; finetunes stay far below 1, another base gives about 1.41): is this "
                "model a finetune of this base?",
                UserWarning,
                stacklevel=3,
            )


def task_vector(
    base: WeightsSource,
    finetuned: WeightsSource | Finetune,
    *,
    head_patterns: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> TaskVector:
    """Split ``finetuned`` against ``base``.

    Args:
        base: the pretrained weights (folder, file, module or state dict).
        finetuned: the finetuned weights, named like the base or with a wrapper
            prefix (``bert.``); the prefix is found automatically. A PEFT LoRA
            adapter folder, a ``PeftModel`` or a module holding one is merged
            with PEFT's ``merge_and_unload`` on a copy; its ``modules_to_save``
            become the head (:func:`skillbank.vectors.adapters.merged_finetune`).
        head_patterns: regexes of shared names to treat as head anyway (e.g. a
            classifier both models have but that is task specific).
        device: where ``τ`` and the head are computed and kept; default the
            finetuned weights' device (a folder is read onto the CPU). The base is
            brought there one tensor at a time, wherever it lives
            (:mod:`skillbank.devices`).

    Raises:
        TaskVectorError: no shared floating-point parameters, NaN/Inf values, or
            a finetune equal to the base (τ all zero). A τ as large as the base's
            weights (:data:`MAX_RELATIVE_NORM`) gives a warning: another base?
    """
    finetune = merged_finetune(finetuned, base)
    head_patterns = (*head_patterns, *finetune.head_patterns)
    # one name per tensor: tied input embeddings and LM head are one tensor, counted once
    base_state = {k: v for k, v in drop_aliases(load_weights(base)).items() if is_float(v)}
    ft_state = {k: v for k, v in drop_aliases(load_weights(finetune.weights)).items() if is_float(v)}
    shared_names = pair_shared(
        {k: list(v.shape) for k, v in base_state.items()}, {k: list(v.shape) for k, v in ft_state.items()}, head_patterns
    )
    used = set(shared_names.values())
    where = torch.device(device) if device is not None else device_of(ft_state.values())
    shared = {
        b: ft_state[f].detach().to(where, torch.float32) - base_state[b].detach().to(where, torch.float32)
        for b, f in shared_names.items()
    }
    head = {f: t.detach().to(where) for f, t in ft_state.items() if f not in used}
    check_finite(shared, "task vector of")
    check_finite(head, "head tensor")
    plausibility = Plausibility()
    for b, tau in shared.items():
        plausibility.add(tau, base_state[b])
    plausibility.check()
    return TaskVector(
        shared=shared,
        head=head,
        base_fingerprint=base_fingerprint(base_state, shared),
        names=shared_names,
        dtypes={b: str(base_state[b].dtype) for b in shared_names},
        source=dict(finetune.source),
    )

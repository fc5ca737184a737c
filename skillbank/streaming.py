"""Dataless localization read one tensor at a time: peak memory O(k + the largest tensor), never O(model).

:func:`localize_streaming` gives the same skill, bit for bit, as
``localize_dataless(task_vector(base, finetuned), ...)`` — same names, order,
tie-breaking, values, head and base fingerprint — but reads the base and the
finetune (safetensors files or sharded Hugging Face folders) tensor by tensor
and keeps the global top-k of ``|τ|`` as a running selection, so a model far
larger than memory can be localized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from skillbank.errors import SkillbankError, TaskVectorError
from skillbank.localize import skill_from_regions
from skillbank.skill import Region, Skill
from skillbank.sparse import check_sparsity, num_selected
from skillbank.task_vectors import Plausibility, check_finite, matches
from skillbank.weights import align_names, fingerprint_from_digests, require_safetensors, tensor_digest

__all__ = ["SafetensorsReader", "localize_streaming"]

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SafetensorsReader:
    """The tensors of a ``.safetensors`` file or a (sharded) model folder, listed from the headers and read one at a time.

    Names come in the order :func:`~skillbank.weights.load_state_dict` gives them
    (shards in sorted order, each in its file's order), so results that depend on
    the order (tie-breaking) match the in-memory path.
    """

    def __init__(self, source: str | Path) -> None:
        from skillbank.pull import resolve_model

        path = Path(resolve_model(str(source)))
        if path.is_dir():
            require_safetensors(path)
            index = path / "model.safetensors.index.json"
            if (path / "model.safetensors").is_file():
                files = [path / "model.safetensors"]
            else:
                files = [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        elif path.is_file() and path.suffix == ".safetensors":
            files = [path]
        else:
            raise SkillbankError(f"{path} is neither a .safetensors file nor a model folder holding model.safetensors.")
        self.file: dict[str, Path] = {}
        self.shape: dict[str, list[int]] = {}
        self.dtype: dict[str, str] = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.file[name], self.shape[name], self.dtype[name] = file, list(view.get_shape()), view.get_dtype()

    @property
    def float_names(self) -> list[str]:
        """Names of the floating-point tensors, in order."""
        return [n for n in self.file if self.dtype[n] in _FLOAT_DTYPES]

    def read(self, name: str) -> Tensor:
        """Tensor ``name``, read alone (its file is mapped only while it is read)."""
        with safe_open(str(self.file[name]), "pt") as handle:
            return handle.get_tensor(name)


class _RunningTopk:
    """The ``k`` largest scores seen so far, ties to the earliest position: positions arrive ascending, so
    what leaves the selection can never re-enter it and the end result is the global top-k."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = torch.empty(0)
        self.positions = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0)

    def offer(self, tau: Tensor, offset: int) -> None:
        flat = tau.reshape(-1)
        scores = torch.cat([self.scores, flat.abs()])
        positions = torch.cat([self.positions, torch.arange(offset, offset + flat.numel())])
        values = torch.cat([self.values, flat])
        if scores.numel() > self.k:
            threshold = torch.kthvalue(scores, scores.numel() - self.k + 1).values
            keep = scores > threshold
            missing = self.k - int(keep.sum())
            keep[torch.nonzero(scores == threshold).squeeze(1)[:missing]] = True  # ties: earliest positions
            chosen = torch.nonzero(keep).squeeze(1)
            scores, positions, values = scores[chosen], positions[chosen], values[chosen]
        self.scores, self.positions, self.values = scores, positions, values


def localize_streaming(
    base: str | Path,
    finetuned: str | Path,
    sparsity: float = 0.01,
    *,
    name: str,
    exclude: Sequence[str] = (),
    head_patterns: Sequence[str] = (),
    **skill_fields: Any,
) -> Skill:
    """The dataless skill of ``finetuned`` over ``base``, reading one tensor of each at a time.

    Args:
        base, finetuned: ``.safetensors`` files or model folders (``save_pretrained``
            output, single or sharded; ``pulled:<alias>`` too). A LoRA adapter folder
            needs the in-memory path (:func:`~skillbank.task_vector`).
        sparsity, name, exclude, skill_fields: as in :func:`~skillbank.localize_dataless`.
        head_patterns: as in :func:`~skillbank.task_vector`.

    Raises:
        TaskVectorError: as :func:`~skillbank.task_vector` and :func:`~skillbank.localize_dataless` do.
    """
    check_sparsity(sparsity)
    base_reader, ft_reader = SafetensorsReader(base), SafetensorsReader(finetuned)
    names = align_names(base_reader.float_names, ft_reader.float_names)
    shared = {b: f for b, f in names.items() if base_reader.shape[b] == ft_reader.shape[f]
              and not matches(b, head_patterns) and not matches(f, head_patterns)}
    if not shared:
        raise TaskVectorError(
            "the base and finetuned models share no floating-point parameter with the same name and shape "
            f"(base has e.g. {sorted(base_reader.float_names)[:3]}, finetuned has e.g. {sorted(ft_reader.float_names)[:3]}); "
            "is this the base the model was finetuned from?"
        )
    eligible = [b for b in shared if not matches(b, exclude)]
    if not eligible:
        raise TaskVectorError(f"exclude={list(exclude)} leaves no shared parameter to localize.")
    sizes = {b: math.prod(base_reader.shape[b]) for b in eligible}
    k = num_selected(sparsity, sum(sizes.values()))
    selection, offsets, digests, dtypes = _RunningTopk(k), {}, {}, {}
    plausibility, offset = Plausibility(), 0
    for b, f in shared.items():
        base_tensor = base_reader.read(b)
        tau = ft_reader.read(f).float() - base_tensor.float()
        check_finite({b: tau}, "task vector of")
        plausibility.add(tau, base_tensor)
        digests[b], dtypes[b] = tensor_digest(base_tensor), str(base_tensor.dtype)
        if b in sizes:
            offsets[b] = offset
            selection.offer(tau, offset)
            offset += sizes[b]
        del base_tensor, tau
    plausibility.check()
    used = set(shared.values())
    head = {f: ft_reader.read(f) for f in ft_reader.float_names if f not in used}
    check_finite(head, "head tensor")
    regions = {}
    for b in shared:
        if b in offsets:  # the selection is in ascending position: each tensor's part is one slice
            lo, hi = torch.searchsorted(selection.positions, torch.tensor([offsets[b], offsets[b] + sizes[b]])).tolist()
            regions[b] = Region(selection.positions[lo:hi] - offsets[b], selection.values[lo:hi].clone())
        else:
            regions[b] = Region(torch.empty(0, dtype=torch.int64), torch.empty(0))
    settings = {"k": k, "exclude": list(exclude), "tie_break": "earliest position"}
    return skill_from_regions(
        regions, shapes={b: base_reader.shape[b] for b in shared}, base_fingerprint=fingerprint_from_digests(digests),
        dtypes=dtypes, head=head, name=name, sparsity=sparsity, method="dataless", settings=settings, **skill_fields,
    )

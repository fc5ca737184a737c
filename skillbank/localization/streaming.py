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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from skillbank.errors import SkillbankError
from skillbank.localization.localize import dataless_settings, eligible_names, skill_from_regions
from skillbank.sparse import check_sparsity, num_selected, topk_positions
from skillbank.storage.skill import Region, Skill
from skillbank.vectors.models import model_path, require_safetensors
from skillbank.vectors.task_vectors import Plausibility, check_finite, nonfinite_error, pair_shared
from skillbank.vectors.weights import chunked_digest, fingerprint_from_digests

__all__ = ["CHUNK_ENTRIES", "SafetensorsReader", "localize_streaming"]

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_FLOAT_DTYPES = set(_TORCH_DTYPES)
#: Entries per piece a tensor is read in: the streaming path's working set is a few such pieces plus the selection.
CHUNK_ENTRIES = 1 << 22


class SafetensorsReader:
    """The tensors of a ``.safetensors`` file or a (sharded) model folder, listed from the headers and read one at a time.

    Names come in the order :func:`~skillbank.vectors.weights.load_weights` gives them
    (shards in sorted order, each in its file's order), so results that depend on
    the order (tie-breaking) match the in-memory path.
    """

    def __init__(self, source: str | Path) -> None:
        path = model_path(source)
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

    def torch_dtype(self, name: str) -> torch.dtype:
        """Tensor ``name``'s dtype, from the header."""
        return _TORCH_DTYPES[self.dtype[name]]

    def chunks(self, name: str, entries: int | None = None) -> Iterator[Tensor]:
        """Tensor ``name`` in row-major pieces of whole rows, about ``entries`` (default :data:`CHUNK_ENTRIES`)
        entries each, read one at a time."""
        entries = entries or CHUNK_ENTRIES
        shape = self.shape[name]
        if len(shape) == 0:
            yield self.read(name)
            return
        step = max(1, entries // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            # mapped only while this piece is copied out; onto the CPU whatever torch's default device (a slice
            # would follow it), and the context closed before the piece is handed on
            with safe_open(str(self.file[name]), "pt") as handle, torch.device("cpu"):
                piece = handle.get_slice(name)[start : start + step]
            yield piece


class _RunningTopk:
    """The ``k`` largest scores seen so far, ties to the earliest position: positions arrive ascending, so
    what leaves the selection can never re-enter it and the end result is the global top-k.

    Memory: the selection (``k`` entries) plus what one tensor offers; an entry that
    cannot beat the smallest kept score (a tie loses to the earlier entry) is dropped
    before any copy is made.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = torch.empty(0, device="cpu")  # beside the pieces, which are read onto the CPU
        self.positions = torch.empty(0, dtype=torch.int64, device="cpu")
        self.values = torch.empty(0, device="cpu")

    def offer(self, tau: Tensor, offset: int) -> None:
        flat = tau.reshape(-1)
        new = flat.abs()
        local = None  # which entries of ``flat`` are offered (None: all of them)
        if self.scores.numel() == self.k:  # full: only entries above the smallest kept score can enter
            local = torch.nonzero(new > self.scores.min()).squeeze(1)
            if not local.numel():
                return
            new = new[local]
        held = self.scores.numel()
        scores = torch.cat([self.scores, new]) if held else new
        del new
        chosen = topk_positions(scores, self.k)  # ties: earliest positions
        # kept entries first, then new ones, both ascending
        cut = int(torch.searchsorted(chosen, torch.tensor(held, device=chosen.device)))
        arrived = chosen[cut:] - held if local is None else local[chosen[cut:] - held]
        self.scores = scores[chosen]
        self.positions = torch.cat([self.positions[chosen[:cut]], arrived + offset])
        self.values = torch.cat([self.values[chosen[:cut]], flat[arrived]])


def _tau_pieces(
    base: Iterator[Tensor],
    finetuned: Iterator[Tensor],
    selection: _RunningTopk | None,
    offset: int,
    plausibility: Plausibility,
    bad: list[int],
) -> Iterator[Tensor]:
    """Yield the base's pieces of one tensor (for its digest); on the way, each piece's τ is checked, counted
    for plausibility and offered to ``selection`` at its global position; ``bad[0]`` counts NaN/Inf entries."""
    for base_piece, ft_piece in zip(base, finetuned):
        tau = ft_piece.float() - base_piece.float()
        bad[0] += int((~torch.isfinite(tau)).sum())
        plausibility.add(tau, base_piece)
        if selection is not None and not bad[0]:
            selection.offer(tau, offset)
        offset += tau.numel()
        yield base_piece


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
    shared = pair_shared(
        {n: base_reader.shape[n] for n in base_reader.float_names},
        {n: ft_reader.shape[n] for n in ft_reader.float_names},
        head_patterns,
    )
    eligible = eligible_names(shared, exclude)
    sizes = {b: math.prod(base_reader.shape[b]) for b in eligible}
    k = num_selected(sparsity, sum(sizes.values()))
    selection, offsets, digests, dtypes = _RunningTopk(k), {}, {}, {}
    plausibility, offset = Plausibility(), 0
    for b, f in shared.items():
        bad = [0]
        select = selection if b in sizes else None
        base_pieces = _tau_pieces(base_reader.chunks(b), ft_reader.chunks(f), select, offset, plausibility, bad)
        digests[b] = chunked_digest(base_reader.torch_dtype(b), base_reader.shape[b], base_pieces)
        dtypes[b] = str(base_reader.torch_dtype(b))
        if bad[0]:
            raise nonfinite_error("task vector of", b, bad[0])
        if b in sizes:
            offsets[b] = offset
            offset += sizes[b]
    plausibility.check()
    used = set(shared.values())
    head = {f: ft_reader.read(f) for f in ft_reader.float_names if f not in used}
    check_finite(head, "head tensor")
    regions = {}
    for b in shared:
        if b in offsets:  # the selection is in ascending position: each tensor's part is one slice
            lo, hi = torch.searchsorted(
                selection.positions, torch.tensor([offsets[b], offsets[b] + sizes[b]], device=selection.positions.device)
            ).tolist()
            regions[b] = Region(selection.positions[lo:hi] - offsets[b], selection.values[lo:hi].clone())
        else:
            regions[b] = Region(torch.empty(0, dtype=torch.int64, device="cpu"), torch.empty(0, device="cpu"))
    return skill_from_regions(
        regions,
        shapes={b: base_reader.shape[b] for b in shared},
        base_fingerprint=fingerprint_from_digests(digests),
        dtypes=dtypes,
        head=head,
        name=name,
        sparsity=sparsity,
        method="dataless",
        settings=dataless_settings(k, exclude),
        **skill_fields,
    )

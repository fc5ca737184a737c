"""Pure tensor functions: global top-k selection and compact sorted-index codes.

Kept apart from the stateful classes and tested against plain reference
implementations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import torch
from torch import Tensor

from skillbank.errors import SkillbankError

__all__ = [
    "BLOCK",
    "check_sparsity",
    "decode_indices",
    "encode_indices",
    "global_top_runs",
    "global_topk",
    "num_selected",
    "topk_positions",
]

#: Block length of the ``blocked`` index code: positions are stored as their low
#: 16 bits plus one count per block of 65,536 positions.
BLOCK = 1 << 16


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` if it lies in (0, 1], else raise a clear error."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
        raise SkillbankError(f"sparsity must be a fraction in (0, 1] (e.g. 0.01 for 1% of the parameters), got {sparsity!r}.")
    return float(sparsity)


def num_selected(sparsity: float, total: int) -> int:
    """``k = ceil(s · P)``, computed on the decimal value of ``s`` so 0.07·100 is 7, not 8.

    >>> num_selected(0.01, 1000), num_selected(0.07, 100), num_selected(1e-9, 10)
    (10, 7, 1)
    """
    check_sparsity(sparsity)
    return max(1, min(total, math.ceil(Fraction(repr(float(sparsity))) * total)))


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """Ascending positions of the ``k`` largest entries of the flat ``scores`` (all of them when ``k`` covers
    them); ties at the threshold go to the earliest positions, so the result never depends on the backend's sort.

    >>> topk_positions(torch.tensor([1., 3., 3., 0.]), 2).tolist()
    [1, 2]
    """
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    # kthvalue runs where the scores live on CPU and CUDA (no copy of a whole model's scores); elsewhere on the CPU
    source = scores if scores.device.type in ("cpu", "cuda") else scores.cpu()
    threshold = torch.kthvalue(source, scores.numel() - k + 1).values.to(scores.device)
    keep = scores > threshold
    keep[torch.nonzero(scores == threshold).squeeze(1)[: k - int(keep.sum())]] = True
    return torch.nonzero(keep).squeeze(1)


def global_topk(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Sorted flat indices of the ``k`` largest entries over all tensors together.

    Ties at the threshold go to the earlier position, where positions are
    ordered by the mapping's order, then flat index: the result never depends
    on the backend's sort.

    Args:
        scores: ``{name: tensor}``; all entries must be finite.
        k: how many entries to select, ``1 <= k <= total``.

    Returns:
        ``{name: int64 tensor}`` of ascending flat indices, one per input name
        (possibly empty).

    >>> global_topk({"a": torch.tensor([3., 1.]), "b": torch.tensor([1., 5.])}, 3)
    {'a': tensor([0, 1]), 'b': tensor([1])}
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    total = flat.numel()
    if not 1 <= k <= total:
        raise SkillbankError(f"cannot select {k} entries out of {total}.")
    chosen = topk_positions(flat, k)
    del flat
    return _split_positions(chosen, names, [scores[n].numel() for n in names])


def _split_positions(chosen: Tensor, names: list[str], sizes: list[int]) -> dict[str, Tensor]:
    """Ascending positions over tensors laid end to end (``sizes`` each, in ``names``' order), as each tensor's own."""
    offsets = torch.tensor([0, *sizes], device=chosen.device).cumsum(0)
    cuts = torch.searchsorted(chosen, offsets).tolist()
    return {n: chosen[cuts[i] : cuts[i + 1]] - offsets[i] for i, n in enumerate(names)}


def global_top_runs(scores: Mapping[str, Tensor], k: int, block: int) -> dict[str, Tensor]:
    """Sorted flat indices of whole runs ``[j·b, (j + 1)·b)`` of each tensor (the last one shorter where ``b`` does
    not divide it): the fewest runs, in order of their summed score, that hold at least ``k`` entries.

    Ties go to the earlier run, in the mapping's order, then position, as in :func:`global_topk`.

    >>> global_top_runs({"a": torch.tensor([3., 1., 0., 0., 2.]), "b": torch.tensor([1., 2.])}, 3, 2)
    {'a': tensor([0, 1]), 'b': tensor([0, 1])}
    """
    names = list(scores)
    sums, lengths = [], []
    for n in names:
        flat = scores[n].detach().reshape(-1).float()
        sums.append(torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block).sum(1))
        length = torch.full_like(sums[-1], block, dtype=torch.int64)
        if length.numel():  # the last run is short where block does not divide the tensor
            length[-1] = flat.numel() - block * (length.numel() - 1)
        lengths.append(length)
    total = sum(int(t.sum()) for t in lengths)
    if not 1 <= k <= total:
        raise SkillbankError(f"cannot select {k} entries out of {total}.")
    order = torch.sort(torch.cat(sums), descending=True, stable=True).indices  # equal sums keep the earlier run first
    held = torch.cat(lengths)[order].cumsum(0)
    chosen = order[: int(torch.searchsorted(held, k)) + 1].sort().values
    out = {}
    for n, runs in _split_positions(chosen, names, [t.numel() for t in lengths]).items():
        entries = (runs.unsqueeze(1) * block + torch.arange(block, device=runs.device)).reshape(-1)
        out[n] = entries[entries < scores[n].numel()]
    return out


def encode_indices(indices: Tensor, numel: int) -> dict[str, Tensor]:
    """Encode ascending flat indices into the smallest exact form.

    ``idx`` as uint8 or uint16 when the tensor is that small; otherwise
    ``lo`` (the low 16 bits, uint16) plus ``blk`` (int32 count per block of
    :data:`BLOCK` positions): 2 bytes per entry plus 4 bytes per 65,536
    positions, which is what keeps a 1% skill at about 1.5% of the dense size.

    >>> codes = encode_indices(torch.tensor([1, 70000]), 200000)
    >>> sorted(codes), decode_indices(codes, 200000).tolist()
    (['blk', 'lo'], [1, 70000])
    """
    indices = indices.to("cpu", torch.int64)
    if numel <= 1 << 8:
        return {"idx": indices.to(torch.uint8)}
    if numel <= 1 << 16:
        return {"idx": indices.to(torch.uint16)}
    blocks = -(-numel // BLOCK)
    counts = torch.bincount(indices // BLOCK, minlength=blocks).to(torch.int32)
    return {"lo": (indices % BLOCK).to(torch.uint16), "blk": counts}


def decode_indices(codes: Mapping[str, Tensor], numel: int) -> Tensor:
    """Invert :func:`encode_indices`, checking the codes are integers and the result is ascending and in range."""
    for part, code in codes.items():
        if code.is_floating_point() or code.is_complex() or code.dtype == torch.bool:
            raise SkillbankError(f"index part {part!r} is {code.dtype}, not an integer type.")
    if "idx" in codes:
        indices = codes["idx"].to(torch.int64)
    elif "lo" in codes and "blk" in codes:
        counts = codes["blk"].to(torch.int64)
        if counts.numel() != -(-numel // BLOCK) or bool((counts < 0).any()) or int(counts.sum()) != codes["lo"].numel():
            raise SkillbankError("block counts do not match the stored indices.")
        starts = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device) * BLOCK, counts)
        indices = starts + codes["lo"].to(torch.int64)
    else:
        raise SkillbankError(f"unknown index code with parts {sorted(codes)}.")
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel or bool((indices[1:] <= indices[:-1]).any())):
        raise SkillbankError(f"indices are not strictly ascending inside [0, {numel}).")
    return indices

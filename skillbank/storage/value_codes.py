"""Task-vector values in k bits: a sign bit and a magnitude bin, with one small table of levels per tensor.

``1bit`` is sign × one scale (the region's mean ``|τ|``, the least-squares
scale). With ``k`` bits, the ``|τ|`` of a region get ``2**(k-1)`` levels:
a start of equal-count bins (quantiles), then a few Lloyd steps (each entry to
its nearest level, each level to the mean ``|τ|`` of its members), which
lower the squared error on heavy tails where quantiles alone waste the top
bin. Every level is the mean of its members: the least-squares level. Codes are ``bin << 1 | sign``, packed ``k`` bits each
(:mod:`skillbank.storage.bit_packing`); the levels are float32.

A skill file stores them as ``region/<name>/val_code`` and
``region/<name>/val_levels`` (format 3).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from skillbank.errors import SkillbankError
from skillbank.storage.bit_packing import pack_bits, packed_size, unpack_bits
from skillbank.storage.format import VALUE_CODE_BITS

__all__ = ["decode_values", "encode_values"]

#: Lloyd steps after the equal-count start: enough to settle on task vectors' heavy tails, cheap (one sort each).
_LLOYD_STEPS = 8


def encode_values(values: Tensor, bits: int) -> dict[str, Tensor]:
    """``values`` coded in ``bits`` bits each: ``{"val_code": uint8 bytes, "val_levels": float32 [2**(bits-1)]}``.

    >>> codes = encode_values(torch.tensor([0.5, -1.5, 1.0, -1.0]), 1)
    >>> codes["val_levels"].tolist(), decode_values(codes, 4, 1).tolist()
    ([1.0], [1.0, -1.0, 1.0, -1.0])
    """
    if bits not in VALUE_CODE_BITS.values():
        raise SkillbankError(f"values are coded in {sorted(set(VALUE_CODE_BITS.values()))} bits, not {bits}.")
    values = values.detach().reshape(-1).to("cpu", torch.float32)
    magnitude = values.abs().double()
    bins = 1 << (bits - 1)
    order = torch.argsort(magnitude, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device="cpu")
    member = (rank * bins) // max(1, order.numel())  # equal-count bins by rank (a stable sort: the same codes on any backend)
    levels = _bin_means(magnitude, member, bins, torch.zeros(bins, dtype=torch.float64, device="cpu"))
    for _ in range(_LLOYD_STEPS if bins > 1 else 0):  # each step lowers the squared error: nearest level, then means
        member = torch.bucketize(magnitude, (levels[1:] + levels[:-1]) / 2)
        levels = _bin_means(magnitude, member, bins, levels)
    codes = (member << 1) | (values < 0).long()
    return {"val_code": pack_bits(codes, bits), "val_levels": levels.float()}


def _bin_means(magnitude: Tensor, member: Tensor, bins: int, previous: Tensor) -> Tensor:
    """The mean magnitude of each bin's members (``previous`` where a bin is empty), kept ascending."""
    totals = torch.zeros(bins, dtype=torch.float64, device="cpu").index_add_(0, member, magnitude)
    counts = torch.bincount(member, minlength=bins)
    return torch.where(counts > 0, totals / counts.clamp(min=1), previous).cummax(0).values


def decode_values(codes: Mapping[str, Tensor], count: int, bits: int) -> Tensor:
    """The ``count`` float32 values that :func:`encode_values` coded, every part checked against ``count`` and ``bits``.

    Raises:
        SkillbankError: when a part is missing, of the wrong dtype or size, or a level is negative or not finite.
    """
    packed, levels = codes.get("val_code"), codes.get("val_levels")
    if packed is None or levels is None or set(codes) != {"val_code", "val_levels"}:
        raise SkillbankError(f"coded values need exactly 'val_code' and 'val_levels', got {sorted(codes)}.")
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(count, bits):
        raise SkillbankError(f"{count} values of {bits} bits take {packed_size(count, bits)} uint8 bytes, got {packed.numel()}.")
    if levels.dtype != torch.float32 or levels.numel() != 1 << (bits - 1):
        raise SkillbankError(f"{bits}-bit values need {1 << (bits - 1)} float32 levels, got {levels.numel()} {levels.dtype}.")
    if not bool(torch.isfinite(levels).all()) or bool((levels < 0).any()):
        raise SkillbankError("value levels must be finite and non-negative.")
    code = unpack_bits(packed, count, bits)
    magnitude = levels.reshape(-1)[code >> 1]
    return torch.where((code & 1).bool(), -magnitude, magnitude)

"""Positions coded near their entropy: Elias–Fano or a bitmap, whichever is smaller per tensor.

A region's ascending flat indices into a tensor of ``numel`` entries cost
16 bits each in the plain code (:func:`skillbank.sparse.encode_indices`).
At density ``d`` their entropy is ``H(d) / d`` bits each (about 4.2 at 14%,
8 at 1%). Two codes come within a bit or two of it:

- **Elias–Fano** (parts ``ef_lo``, ``ef_hi``): each index's low
  ``l = floor(log2(numel / n))`` bits packed, and its high part in unary: a
  bit vector of ``n + (numel - 1 >> l) + 1`` bits with a one at
  ``high_i + i``. About ``2 + log2(1 / d)`` bits an entry.
- **bitmap** (part ``bits``): one bit per entry of the tensor; smaller than
  Elias–Fano above a density of about 20%.

:func:`encode_positions` returns the smallest of these and the plain code;
:func:`decode_positions` reads all three and checks what a crafted file may
declare (sizes, ranges, strict order).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from skillbank.errors import SkillbankError
from skillbank.sparse import BLOCK, decode_indices, encode_indices
from skillbank.storage.bit_packing import pack_bits, packed_size, unpack_bits, unpack_flags

__all__ = ["decode_positions", "encode_positions", "positions_size"]


def _low_width(count: int, numel: int) -> int:
    """Elias–Fano's low-bit width for ``count`` indices below ``numel``."""
    return max(0, (numel // count).bit_length() - 1) if count else 0


def positions_size(count: int, numel: int) -> dict[str, int]:
    """Bytes each code takes for ``count`` indices in a tensor of ``numel`` entries: ``plain``, ``elias_fano``, ``bitmap``.

    >>> positions_size(1000, 100_000)
    {'plain': 2008, 'elias_fano': 1071, 'bitmap': 12500}
    """
    plain = count * (1 if numel <= 1 << 8 else 2) + (4 * -(-numel // BLOCK) if numel > 1 << 16 else 0)
    low = _low_width(count, numel)
    elias_fano = packed_size(count, low) + packed_size(count + ((numel - 1) >> low) + 1, 1)
    return {"plain": plain, "elias_fano": elias_fano, "bitmap": packed_size(numel, 1)}


def encode_positions(indices: Tensor, numel: int) -> dict[str, Tensor]:
    """Ascending flat ``indices`` (below ``numel``) in the smallest code of :func:`positions_size` (ties: the plain code).

    >>> codes = encode_positions(torch.arange(0, 100_000, 100), 100_000)
    >>> sorted(codes), decode_positions(codes, 100_000).equal(torch.arange(0, 100_000, 100))
    (['ef_hi', 'ef_lo'], True)
    """
    indices = indices.to("cpu", torch.int64)
    sizes = positions_size(indices.numel(), numel)
    best = min(sizes, key=lambda code: (sizes[code], code != "plain"))
    if best == "plain":
        return encode_indices(indices, numel)
    if best == "bitmap":
        flags = torch.zeros(numel, dtype=torch.int64, device="cpu")
        flags[indices] = 1
        return {"bits": pack_bits(flags, 1)}
    low = _low_width(indices.numel(), numel)
    high = torch.zeros(indices.numel() + ((numel - 1) >> low) + 1, dtype=torch.int64, device="cpu")
    high[(indices >> low) + torch.arange(indices.numel(), device="cpu")] = 1
    return {"ef_lo": pack_bits(indices & ((1 << low) - 1), low), "ef_hi": pack_bits(high, 1)}


def decode_positions(codes: Mapping[str, Tensor], numel: int) -> Tensor:
    """Invert :func:`encode_positions`: int64 indices, checked ascending and inside ``[0, numel)``.

    Raises:
        SkillbankError: when the parts are not integers, have the wrong sizes, or decode to a bad order.
    """
    for part, code in codes.items():
        if code.is_floating_point() or code.is_complex() or code.dtype == torch.bool:
            raise SkillbankError(f"index part {part!r} is {code.dtype}, not an integer type.")
    if "bits" in codes and len(codes) == 1:
        bits = codes["bits"]
        if bits.dtype != torch.uint8 or bits.numel() != packed_size(numel, 1):
            raise SkillbankError(f"a position bitmap must be {packed_size(numel, 1)} uint8 bytes, got {bits.numel()}.")
        return torch.nonzero(unpack_flags(bits, numel)).squeeze(1)
    if set(codes) == {"ef_lo", "ef_hi"}:
        return _decode_elias_fano(codes["ef_lo"], codes["ef_hi"], numel)
    return decode_indices(codes, numel)


def _decode_elias_fano(lo: Tensor, hi: Tensor, numel: int) -> Tensor:
    """Elias–Fano's indices from its packed low bits and unary high bits, every size checked against ``numel``."""
    if lo.dtype != torch.uint8 or hi.dtype != torch.uint8 or hi.numel() > packed_size(2 * numel + 1, 1):
        raise SkillbankError("Elias–Fano parts must be uint8 bytes no longer than the tensor allows.")
    ones = torch.nonzero(unpack_flags(hi, hi.numel() * 8)).squeeze(1)
    count = ones.numel()
    low = _low_width(count, numel)
    if not 0 < count <= numel or hi.numel() != packed_size(count + ((numel - 1) >> low) + 1, 1):
        raise SkillbankError(f"Elias–Fano high bits hold {count} entries in {hi.numel()} bytes; they do not fit {numel}.")
    if lo.numel() != packed_size(count, low):
        raise SkillbankError(
            f"Elias–Fano low bits are {lo.numel()} bytes; {count} entries of {low} bits take {packed_size(count, low)}."
        )
    indices = ((ones - torch.arange(count, device="cpu")) << low) | unpack_bits(lo, count, low)
    if int(indices[-1]) >= numel or bool((indices[1:] <= indices[:-1]).any()):
        raise SkillbankError(f"indices are not strictly ascending inside [0, {numel}).")
    return indices

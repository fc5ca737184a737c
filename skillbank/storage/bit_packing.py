"""Pack small unsigned integers into bytes and back: the storage under compact positions and values.

Each value takes ``width`` bits, least significant first, values one after
another; the last byte is padded with zero bits. Work goes in chunks so the
temporary bit matrix stays bounded (a few MB) whatever the tensor's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "packed_size", "unpack_bits", "unpack_flags"]

#: Values packed per chunk: a multiple of 8, so every chunk starts on a byte.
_CHUNK = 1 << 18


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits take.

    >>> packed_size(10, 3), packed_size(0, 5), packed_size(4, 0)
    (4, 0, 0)
    """
    return -(-count * width // 8)


def pack_bits(values: Tensor, width: int) -> Tensor:
    """``values`` (non-negative integers below ``2**width``) packed into a uint8 tensor of :func:`packed_size` bytes.

    >>> pack_bits(torch.tensor([1, 2, 3]), 2).tolist()
    [57]
    """
    values = values.reshape(-1).to("cpu", torch.int64)
    if width == 0 or not values.numel():
        return torch.empty(0, dtype=torch.uint8, device="cpu")
    shifts = torch.arange(width, device="cpu")
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int64, device="cpu")
    parts = []
    for start in range(0, values.numel(), _CHUNK):
        bits = ((values[start : start + _CHUNK, None] >> shifts) & 1).reshape(-1)
        bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8))
        parts.append((bits.view(-1, 8) * weights).sum(1).to(torch.uint8))
    return torch.cat(parts)


def unpack_bits(packed: Tensor, count: int, width: int) -> Tensor:
    """The ``count`` int64 values of ``width`` bits that :func:`pack_bits` wrote into ``packed``.

    The caller checks ``packed`` holds exactly :func:`packed_size` bytes.

    >>> unpack_bits(torch.tensor([57], dtype=torch.uint8), 3, 2).tolist()
    [1, 2, 3]
    """
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device="cpu")
    packed = packed.reshape(-1).to("cpu", torch.uint8)
    if 8 % width == 0:  # whole values in each byte: shift them out directly (several times faster)
        return _byte_fields(packed, count, width).long()
    shifts = torch.arange(8, device="cpu", dtype=torch.uint8)
    weights = torch.tensor([1 << b for b in range(width)], dtype=torch.int64, device="cpu")
    parts = []
    step = _CHUNK * width // 8  # bytes per chunk of values (a whole number: _CHUNK is a multiple of 8)
    for start in range(0, packed.numel(), step):
        bits = ((packed[start : start + step, None] >> shifts) & 1).reshape(-1)
        values = bits[: bits.numel() // width * width].view(-1, width).to(torch.int64)
        parts.append((values * weights).sum(1))
    return torch.cat(parts)[:count]


def unpack_flags(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` bits of ``packed`` as a bool tensor (a bitmap, least significant bit first)."""
    return _byte_fields(packed.reshape(-1).to("cpu", torch.uint8), count, 1).bool()


def _byte_fields(packed: Tensor, count: int, width: int) -> Tensor:
    """The first ``count`` fields of ``width`` bits (a divisor of 8) of the uint8 ``packed``, as uint8."""
    shifts = torch.arange(0, 8, width, device="cpu", dtype=torch.uint8)
    return ((packed[: packed_size(count, width), None] >> shifts) & ((1 << width) - 1)).reshape(-1)[:count]

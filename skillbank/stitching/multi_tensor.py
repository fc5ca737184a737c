"""Gather and scatter over many tensors in one kernel launch (Triton, on CUDA), bit for bit.

The Stitcher writes one skill into every tensor of a model (about 200 for
RoBERTa-base). On a GPU a kernel per tensor costs far more than the work, so
here the entries of all tensors are reached through one table of addresses and
moved as raw words of their dtype's size: a value lands exactly as a per-tensor
``index_copy_`` of the same (already cast) value would write it.

Used only where Triton imports and the tensors live on a CUDA device; every
other case (the CPU, other accelerators, a model of mixed dtypes) keeps the
per-tensor loop. Setting ``SKILLBANK_MULTI_TENSOR=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["AddressTable", "enabled", "gather", "scatter"]

_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 1024


@functools.cache
def _kernels() -> tuple[Any, Any] | None:
    """The two Triton kernels, or None where Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def scatter_words(table, ids, positions, words, n, BYTES: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        tid = tl.load(ids + offs, mask=live, other=0)
        pos = tl.load(positions + offs, mask=live, other=0)
        address = tl.load(table + tid, mask=live, other=0) + pos * BYTES
        tl.store(address.to(words.dtype), tl.load(words + offs, mask=live), mask=live)

    @triton.jit
    def gather_words(table, ids, positions, select, out, n, BYTES: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        row = tl.load(select + offs, mask=live, other=0)
        tid = tl.load(ids + row, mask=live, other=0)
        pos = tl.load(positions + row, mask=live, other=0)
        address = tl.load(table + tid, mask=live, other=0) + pos * BYTES
        tl.store(out + offs, tl.load(address.to(out.dtype), mask=live), mask=live)

    return scatter_words, gather_words


def enabled(tensors: Sequence[Tensor]) -> bool:
    """Whether the one-launch path serves ``tensors``: all on one CUDA device, of one dtype, Triton importable."""
    if os.environ.get("SKILLBANK_MULTI_TENSOR", "1") == "0" or not tensors:
        return False
    first = tensors[0]
    if first.device.type != "cuda" or first.element_size() not in _WORDS:
        return False
    if any(t.device != first.device or t.dtype != first.dtype for t in tensors):
        return False
    return _kernels() is not None


class AddressTable:
    """Per tensor, the address its flat position 0 would have in one address space of ``offsets``.

    ``table[t] + position · itemsize`` is the address of the entry at global flat
    ``position`` of tensor ``t`` (meaningful for the tensors of that itemsize).
    Rebuilt whenever a tensor's storage moved (say, ``model.to(...)`` or a
    reassigned ``.data``).
    """

    def __init__(self, tensors: Sequence[Tensor], offsets: Sequence[int]) -> None:
        self._tensors, self._offsets = list(tensors), list(offsets)
        self._key: tuple[torch.device, int, list[int]] | None = None
        self._table: Tensor | None = None

    def current(self, device: torch.device, itemsize: int) -> Tensor:
        """The table for the tensors' present storage, on ``device`` (int64), for entries of ``itemsize`` bytes."""
        key = (device, itemsize, [t.data_ptr() for t in self._tensors])
        if self._table is None or key != self._key:
            self._table = torch.tensor(
                [p - o * itemsize for p, o in zip(key[2], self._offsets)], dtype=torch.int64, device=device
            )
            self._key = key
        return self._table


def _launch(kernel: Any, n: int, *args: Any, size: int) -> None:
    kernel[(-(-n // _BLOCK),)](*args, n, BYTES=size, BLOCK=_BLOCK)


def scatter(table: Tensor, ids: Tensor, positions: Tensor, values: Tensor) -> None:
    """Write ``values[i]`` (already in the tensors' dtype) at global ``positions[i]`` of tensor ``ids[i]``."""
    kernels = _kernels()
    assert kernels is not None, "scatter() needs Triton: check enabled() first"
    if positions.numel():
        size = values.element_size()
        _launch(kernels[0], positions.numel(), table, ids, positions, values.contiguous().view(_WORDS[size]), size=size)


def gather(table: Tensor, ids: Tensor, positions: Tensor, select: Tensor, dtype: torch.dtype) -> Tensor:
    """The values (of ``dtype``) at global ``positions[select]`` of tensors ``ids[select]``."""
    kernels = _kernels()
    assert kernels is not None, "gather() needs Triton: check enabled() first"
    size = dtype.itemsize
    out = torch.empty(select.numel(), dtype=_WORDS[size], device=positions.device)
    if select.numel():
        _launch(kernels[1], select.numel(), table, ids, positions, select, out, size=size)
    return out.view(dtype)

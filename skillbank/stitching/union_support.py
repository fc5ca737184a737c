"""The :class:`~skillbank.Stitcher`'s state: one row per covered entry, found through a hash table.

Every entry that at least one stitched skill covers has a row: its flat position
(the key), its base value, how many skills cover it and the overlap rule's
float64 accumulators. Rows are found through an open-addressing hash table
(hashed re-probing, a power-of-two capacity, loaded 25–75%; 37.5–75% as it grows)
whose first probe keeps the address order (a key's home slot is its position
scaled to the table), so a skill's sorted positions read the table front to back
instead of at random; only the steps after a collision are hashed. An add or a
removal costs O(skill size) whatever the number of skills already
stitched, and nothing is held for an entry no skill covers: memory follows the
skills, not the model.

Bytes per covered entry (the default ``mean`` rule on a float32 or half-precision
model of fewer than 2**31 entries): key 4 + base 4 + count 2 + accumulator 8 =
18 in the rows (up to a quarter more of spare room), plus 4 / load in the table
(5.3–10.7 as it grows, up to 16 just after a rebuild that dropped rows): 23–33
bytes, at most 39. The base is kept in float32 (exact for float32,
bfloat16 and float16 values; float64 where the model has float64 tensors), so writing it back
restores the model bit for bit. Entries whose cover count drops to 0 keep their
row until the table is rebuilt (when it fills, or when such rows outnumber the
covered ones), which drops them; a table that fills while every row is covered is
rebuilt around rows that stay where they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from skillbank.errors import StitchError
from skillbank.stitching.overlap import OverlapRule

__all__ = ["Plan", "UnionSupport"]

_MAX_LOAD = 0.75  # rebuild above this table load
_REBUILT_LOAD = 0.5  # the most load right after a rebuild (a full table doubles: 0.375)
_ROWS_GROWTH = 1.25  # the rows' spare room, at most
_MAX_COUNT = torch.iinfo(torch.int16).max
_MASKED_ROUNDS = 4  # on CUDA: probe rounds over the whole batch before the first wait for the device
_COMPACT_AFTER = 1 << 16  # uncovered rows kept before a rebuild drops them (once they outnumber the covered)
_HASH = -7046029254386353131  # 0x9E3779B97F4A7C15 (Fibonacci hashing) as a signed int64
_ATTEMPT = 0x632BE59BD9B4E019  # an odd constant the probe attempt is scaled by before hashing
_EMPTY = -1


@dataclass
class Plan:
    """An add or remove worked out but not applied: the batch's rows as they will be, and the model's new values."""

    rows: Tensor  # each batch entry's row, -1 where it has none yet (``fresh``)
    fresh: Tensor  # batch positions of the entries that get a new row
    free: Tensor  # for each of those, the empty slot its lookup ended at: where its row goes in, mostly
    keys: Tensor  # the batch's flat positions
    base: Tensor  # float64
    count: Tensor  # float64
    acc: Tensor  # float64, [batch, columns]
    merged: Tensor  # the model's value at each batch entry after the plan (float64)
    live_change: int  # rows that become covered minus rows that stop being covered


def _gather(rows: Tensor, index: Tensor) -> Tensor:
    """``rows.index_select(0, index)``; a one-column table is gathered as a flat tensor, which is faster."""
    if rows.dim() == 2 and rows.shape[1] == 1:
        return rows.view(-1).index_select(0, index).view(-1, 1)
    return rows.index_select(0, index)


def _masked_rounds(device: torch.device) -> int:
    """Probe rounds run over the whole batch before the first wait for the device: on CUDA only (on the CPU the
    work follows the entries, so every round takes only those still probing)."""
    return _MASKED_ROUNDS if device.type == "cuda" else 0


class UnionSupport:
    """Rows of the covered entries of one flat address space, and the hash table that finds them.

    Args:
        numel: entries in the address space (all of the model's float tensors).
        device: where the state lives (the model's device).
        rule: the overlap rule whose accumulators the rows keep.
        base_dtype: the dtype base values are kept in (exact for the model's dtypes).
    """

    def __init__(self, numel: int, device: torch.device, rule: OverlapRule, base_dtype: torch.dtype) -> None:
        self.rule = rule
        self.device = device
        self.numel = numel
        self.key_dtype = torch.int32 if numel < 2**31 else torch.int64
        self.base_dtype = base_dtype
        self.size = 0  # rows in use
        self.live = 0  # rows with a cover count above 0
        self._allocate(0, 0)

    # -- planning and committing ------------------------------------------------

    def plan(self, positions: Tensor, values: Tensor, sign: int, read: Callable[[Tensor], Tensor]) -> Plan:
        """The rows after adding (``sign=1``) or removing (``-1``) ``values`` at ``positions``; nothing changes yet.

        ``read(fresh)`` returns the live values (float64) at the batch positions
        ``fresh`` of entries without a row: no skill covers them, so they hold
        their base. Every other entry's value comes from its row, so a remove
        reads nothing from the model. Room for the new rows is made here, before
        the model is written.
        """
        rows, ends = self._find(positions)
        fresh = torch.nonzero(rows < 0).squeeze(1)
        if sign < 0 and fresh.numel():
            raise StitchError(
                "the stitcher's state has no record of entries the skill covers; it cannot be "
                "removed exactly. stitcher.reset() puts the base back."
            )
        if fresh.numel() and self.size + fresh.numel() > _MAX_LOAD * self.table.numel():
            # The table is full: rebuild it twice as large. That drops the rows nothing covers, so entries of
            # the batch that had one get a new one too; rows move, so look them up again.
            known = rows[rows >= 0]
            uncovered = fresh.numel() + int((self.count.index_select(0, known) == 0).sum())
            self._rebuild(uncovered)
            rows, ends = self._find(positions)
            fresh = torch.nonzero(rows < 0).squeeze(1)
        if self.size + fresh.numel() > self.keys.numel():
            self._grow_rows(self.size + fresh.numel())  # allocations happen here, before the model is written
        found = rows.clamp(min=0)
        base = self.base.index_select(0, found).double()
        count = self.count.index_select(0, found).double()
        acc = _gather(self.acc, found)
        if fresh.numel():
            base[fresh] = read(fresh)
            count[fresh] = 0.0
            acc[fresh] = 0.0
        was_covered = count > 0
        count += sign
        if sign > 0 and bool((count > _MAX_COUNT).any()):
            raise StitchError(f"more than {_MAX_COUNT} skills would cover one entry; the stitcher counts up to that.")
        self.rule.update(acc, values.double(), sign)
        covered = count > 0
        if sign < 0:
            # An uncovered entry's accumulators are reset to exactly 0, so it restores the base bit for bit.
            acc = torch.where(covered.unsqueeze(1), acc, 0.0)
        live_change = int((covered & ~was_covered).sum()) - int((was_covered & ~covered).sum())
        return Plan(
            rows, fresh, ends.index_select(0, fresh), positions, base, count, acc, self._values(base, count, acc), live_change
        )

    def before(self, plan: Plan) -> Tensor:
        """What the model held at ``plan``'s entries before it: the way back when writing it fails."""
        found = plan.rows.clamp(min=0)
        values = self._values(
            self.base.index_select(0, found).double(), self.count.index_select(0, found).double(), _gather(self.acc, found)
        )
        values[plan.fresh] = plan.base[plan.fresh]
        return values

    def commit(self, plan: Plan) -> None:
        """Make ``plan`` the state, in memory :meth:`plan` reserved (only temporaries of the batch's size are made;
        a removal that leaves most rows uncovered then rebuilds the table without them)."""
        known = torch.nonzero(plan.rows >= 0).squeeze(1)
        if known.numel():
            rows = plan.rows.index_select(0, known)
            self.count.index_copy_(0, rows, plan.count.index_select(0, known).to(self.count.dtype))
            self.acc.index_copy_(0, rows, _gather(plan.acc, known))
        if plan.fresh.numel():
            start, stop = self.size, self.size + plan.fresh.numel()
            self.keys[start:stop] = plan.keys.index_select(0, plan.fresh)
            self.base[start:stop] = plan.base.index_select(0, plan.fresh).to(self.base_dtype)
            self.count[start:stop] = plan.count.index_select(0, plan.fresh).to(self.count.dtype)
            self.acc[start:stop] = _gather(plan.acc, plan.fresh)
            self._insert(torch.arange(start, stop, device=self.device), plan.free)
            self.size = stop
        self.live += plan.live_change
        if self.size - self.live > max(self.live, _COMPACT_AFTER):  # mostly rows nothing covers any more: drop them
            self._rebuild(0)  # all or nothing: out of memory here, the state stays as it is (and consistent)

    # -- what the stitcher reports ----------------------------------------------

    def covered(self) -> int:
        """Entries at least one skill covers."""
        return self.live

    def touched(self) -> tuple[Tensor, Tensor]:
        """Flat positions of every entry with a row, ascending, and their base values (float64).

        Entries covered once but dropped since hold their base in the model already.
        """
        keys, order = self.keys[: self.size].long().sort()
        return keys, self.base[: self.size].index_select(0, order).double()

    def nbytes(self) -> int:
        """Bytes held: the rows (spare capacity included) and the table."""
        columns = (self.keys, self.base, self.count, self.acc, self.table)
        return sum(t.numel() * t.element_size() for t in columns)

    # -- the hash table ---------------------------------------------------------

    def _allocate(self, rows: int, slots: int) -> None:
        self.keys = torch.empty(rows, dtype=self.key_dtype, device=self.device)
        self.base = torch.empty(rows, dtype=self.base_dtype, device=self.device)
        self.count = torch.zeros(rows, dtype=torch.int16, device=self.device)
        self.acc = torch.zeros((rows, self.rule.columns), dtype=torch.float64, device=self.device)
        self.table = torch.full((slots,), _EMPTY, dtype=torch.int32, device=self.device)

    def _rebuild(self, extra: int) -> None:
        """Keep the covered rows only, with room for ``extra`` more, in a table loaded at most ``_REBUILT_LOAD``.

        All or nothing: if it fails (out of memory, an interrupt), the state is as it was.
        """
        old = (self.keys, self.base, self.count, self.acc, self.table, self.size, self.live)
        try:
            rows = self.live + extra
            slots = 1 << max(2, math.ceil(math.log2(rows / _REBUILT_LOAD + 1)))
            if self.live == self.size:  # nothing to drop: the rows stay where they are, only the table is new
                self.table = torch.full((slots,), _EMPTY, dtype=torch.int32, device=self.device)
            else:
                keep = torch.nonzero(self.count[: self.size] > 0).squeeze(1)
                self._allocate(int(rows * _ROWS_GROWTH), slots)
                for new, column in zip((self.keys, self.base, self.count, self.acc), old[:4]):
                    new[: keep.numel()] = column.index_select(0, keep)
                self.size = self.live = keep.numel()
            self._insert(torch.arange(self.size, device=self.device), empty_table=True)
        except BaseException:
            self.keys, self.base, self.count, self.acc, self.table, self.size, self.live = old
            raise

    def _grow_rows(self, needed: int) -> None:
        """Room for ``needed`` rows (and a quarter more), the rows kept where they are."""
        size = max(needed, int(self.keys.numel() * _ROWS_GROWTH))
        for name in ("keys", "base", "count", "acc"):
            old = getattr(self, name)
            new = torch.zeros((size, *old.shape[1:]), dtype=old.dtype, device=self.device)
            new[: self.size] = old[: self.size]
            setattr(self, name, new)

    def _home(self, keys: Tensor) -> Tensor:
        """Each key's first slot: its place in the address space scaled to the table's size (in fixed point), so a
        skill's ascending positions probe the table in ascending order: near neighbours in memory, not random
        slots. The probes after a collision are hashed (:meth:`_probe`), so a dense run of keys spreads out."""
        shift = 63 - self.table.numel().bit_length()  # key · scale < slots · 2**shift = 2**62: no int64 overflow
        scale = (self.table.numel() << shift) // self.numel
        return (keys.long() * scale) >> shift

    def _probe(self, keys: Tensor, attempt: int) -> Tensor:
        """Each key's slot at probe ``attempt`` (1, 2, …) after its home: Fibonacci hashing of the key offset by the
        attempt, so every probe of every key is a fresh draw that finds a free slot with the table's free share
        whatever the keys' layout. (A fixed step per key, as double hashing takes, let a key whose step was small
        walk the block of slots that a contiguous run's homes fill, one slot a round: a whole 1M-entry tensor took
        thousands of rounds.) Lookups and inserts follow one sequence, so a lookup that meets an empty slot knows
        the key is absent, as before."""
        offset = (attempt * _ATTEMPT + 2**63) % 2**64 - 2**63  # wrapped to a signed 64-bit value, as the keys' sum wraps
        mixed = (keys.long() + offset) * _HASH
        bits = self.table.numel().bit_length() - 1
        return (mixed >> (64 - bits)) & (self.table.numel() - 1)

    def _find(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The row of each position (-1 where it has none) and, where it has none, the empty slot its probe ended at."""
        rows = torch.full((positions.numel(),), _EMPTY, dtype=torch.int64, device=positions.device)
        ends = rows.clone()
        if self.size == 0:
            return rows, ends
        keys = positions.to(self.key_dtype)
        slot = self._home(keys)
        todo = torch.arange(positions.numel(), device=positions.device)
        attempt = 0
        rounds = _masked_rounds(positions.device)
        if rounds:
            # Rounds over the whole batch, masked, so the host does not wait for the device after each
            # (most entries end in the first two); what is left goes on below.
            open_ = torch.ones_like(keys, dtype=torch.bool)
            for _ in range(rounds):
                row = self.table.index_select(0, slot)
                empty = open_ & (row < 0)
                hit = open_ & (row >= 0) & (self.keys.index_select(0, row.clamp(min=0)) == keys)
                rows = torch.where(hit, row.long(), rows)
                ends = torch.where(empty, slot, ends)
                open_ &= ~(empty | hit)
                attempt += 1
                slot = torch.where(open_, self._probe(keys, attempt), slot)
            todo = torch.nonzero(open_).squeeze(1)
            keys, slot = keys[todo], slot[todo]
        while todo.numel():
            row = self.table.index_select(0, slot)
            empty = row < 0
            hit = (self.keys.index_select(0, row.clamp(min=0)) == keys) & ~empty
            rows.index_copy_(0, todo[hit], row[hit].long())
            ends.index_copy_(0, todo[empty], slot[empty])
            going = torch.nonzero(~(empty | hit)).squeeze(1)
            todo, keys = todo[going], keys[going]
            attempt += 1
            slot = self._probe(keys, attempt)
        return rows, ends

    def _insert(self, rows: Tensor, free: Tensor | None = None, *, empty_table: bool = False) -> None:
        """Put ``rows`` (whose keys are not in the table yet, and distinct) into the table.

        ``free``: an empty slot on each one's probe sequence to try first (where its lookup ended), or -1. A key
        that loses it to another walks its sequence again from the first probe: the slots before that one were
        taken when it looked and stay taken (rows leave the table only in a rebuild), so it lands on the sequence
        past them, where a lookup will find it.
        ``empty_table``: the table holds nothing yet, so the first round claims without looking.
        """
        keys = self.keys.index_select(0, rows)
        slot = self._home(keys)
        if free is not None:
            slot = torch.where(free >= 0, free, slot)
        ids, attempt = rows.int(), 0
        while True:
            if empty_table:
                self.table.index_put_((slot,), ids)
                empty_table = False
            else:
                empty = torch.nonzero(self.table.index_select(0, slot) < 0).squeeze(1)
                self.table.index_put_((slot[empty],), ids[empty])  # where several claim one slot, one of them wins
            going = torch.nonzero(self.table.index_select(0, slot) != ids).squeeze(1)
            if not going.numel():
                return
            ids, keys, attempt = ids[going], keys[going], attempt + 1
            slot = self._probe(keys, attempt)

    # -- values -----------------------------------------------------------------

    def _values(self, base: Tensor, count: Tensor, acc: Tensor) -> Tensor:
        """The model's value for each row: base + the rule's offset where covered, the base elsewhere."""
        return torch.where(count > 0, base + self.rule.delta(acc, count.clamp(min=1)), base)

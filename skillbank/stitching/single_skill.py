"""``SingleSkillSwitcher``: a live model that holds at most one skill, switched by two scatters a tensor.

Serving each task with its own skill never needs overlaps: the model holds one
skill or none. So a switch needs no union table, no counts and no float64
plan: each prepared skill keeps, per tensor, its flat indices, the values to
write there (``base + τ``, computed as :class:`~skillbank.Stitcher` computes
them, so the model is bit for bit what ``Stitcher.active(skill)`` gives) and
the base values there. A switch from A to B writes A's base values back, then
B's values: every entry outside A and B is never touched, and ``switch(None)``
returns the model to its base bit for bit. A coded skill (``2bit`` …) is
decoded once, when prepared, straight into those values.

It holds 16 bytes per prepared entry (indices, values, base values), against
the Stitcher's union state and float64 plan; a switch costs what its scatters
cost, whatever the number of prepared skills. Where a tensor's entries are whole
aligned runs (blocks of 4 to 256 entries, as ``localize_dataless(block=…)`` makes
them), it keeps one index a run and writes whole runs: the same entries and
values, a fraction of the scattered writes (a random 1% scatter is bound by one
cache miss an entry).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from skillbank.errors import StitchError
from skillbank.stitching.heads import use_head
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.storage.skill import Skill, SkillMetadata
from skillbank.vectors.weights import WeightsSource

__all__ = ["RUN_LENGTHS", "SingleSkillSwitcher", "SwitchableSkill", "SwitchPart", "run_length"]

#: The run lengths a prepared tensor is written in, longest first (1: entry by entry).
RUN_LENGTHS = (256, 64, 16, 4)


def run_length(indices: Tensor, numel: int) -> int:
    """The longest length ``b`` of :data:`RUN_LENGTHS` such that the ascending, distinct flat ``indices`` of a tensor of
    ``numel`` entries are whole runs ``[j·b, (j + 1)·b)``; 1 when none is.

    >>> run_length(torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]), 16), run_length(torch.tensor([1, 2, 3, 4]), 16)
    (4, 1)
    """
    n = indices.numel()
    for b in RUN_LENGTHS:
        if n and n % b == 0 and numel % b == 0:
            runs = indices.view(-1, b)
            if bool((runs[:, 0] % b == 0).all()) and bool((runs[:, -1] - runs[:, 0] == b - 1).all()):
                return b
    return 1


class SwitchPart(NamedTuple):
    """One tensor of a prepared skill: ``indices`` of its runs of ``run`` entries (flat indices when ``run`` is 1),
    and the values to write there and the base values, one row a run."""

    name: str
    run: int
    indices: Tensor
    target: Tensor
    base: Tensor

    def entries(self) -> Tensor:
        """The flat indices of every entry it writes, ascending."""
        if self.run == 1:
            return self.indices
        offsets = torch.arange(self.run, device=self.indices.device)
        return (self.indices.unsqueeze(1) * self.run + offsets).reshape(-1)

    def write(self, flat: Tensor, values: Tensor) -> None:
        """Write ``values`` (``target`` or ``base``) into the flat tensor ``flat``: one copy a run."""
        (flat if self.run == 1 else flat.view(-1, self.run)).index_copy_(0, self.indices, values)


@dataclass(frozen=True)
class SwitchableSkill:
    """A skill laid out for one :class:`SingleSkillSwitcher`: per tensor, flat indices, values to write, base values."""

    metadata: SkillMetadata
    head: dict[str, Tensor]
    parts: tuple[SwitchPart, ...]  # per tensor: its runs, base + τ and the base there, on the model's device
    owner: int

    @property
    def name(self) -> str:
        """The skill's name."""
        return self.metadata.name

    @property
    def nbytes(self) -> int:
        """Bytes it holds on the device (its head aside)."""
        return sum(t.numel() * t.element_size() for part in self.parts for t in (part.indices, part.target, part.base))


class SingleSkillSwitcher:
    """Switches ``model`` between skills one at a time: it holds one skill, or none (the base).

    Args:
        model: the live model, holding the base weights when the switcher is made.
        base: optional base weights (folder, file, module or state dict) the model and skills are checked against,
            as :class:`~skillbank.Stitcher` checks them.
        bank: optional bank to read skills by name from.

    Every skill is checked (architecture, base fingerprint, indices, finite values) when prepared, as the
    Stitcher checks it; one with low-rank parts is refused (it is composed matrix by matrix).
    """

    def __init__(self, model: nn.Module, base: WeightsSource | None = None, *, bank: SkillBank | None = None) -> None:
        self.model = model
        self._tensors = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
        # checks and lays out skills, never stitches; fingerprinted now, while the model holds its base, since later
        # a held skill changes what the model holds
        own = {k: v.detach().clone() for k, v in self._tensors.items()} if base is None else base
        self._checker = Stitcher(model, own, bank=bank)
        self._held: SwitchableSkill | None = None

    @property
    def held(self) -> str | None:
        """The held skill's name (``None``: the model holds its base)."""
        return self._held.name if self._held is not None else None

    @property
    def held_skill(self) -> SwitchableSkill | None:
        """The held skill as prepared (``None``: the base)."""
        return self._held

    def prepare(self, skill: Skill | str) -> SwitchableSkill:
        """Check ``skill`` and lay it out: its indices, ``base + τ`` and the base values, per tensor, on the model's
        device. The base values are read from the model (the held skill's entries from what it keeps)."""
        prepared = self._checker.prepare(skill, place=False)  # checked; the union table's layout is not needed here
        batch = prepared.batch
        local, values = batch.local, batch.values
        parts = []
        with torch.no_grad():
            for dst, start, n in batch.spans:
                flat = self._tensors[dst].data.view(-1)
                indices = local[start : start + n].to(flat.device)
                base = self._base_at(dst, indices, flat.index_select(0, indices))
                target = (base.double() + values[start : start + n].to(flat.device).double()).to(flat.dtype)
                run = run_length(indices, flat.numel())
                if run > 1:
                    indices, target, base = indices[::run] // run, target.view(-1, run), base.view(-1, run)
                parts.append(SwitchPart(dst, run, indices, target, base))
        return SwitchableSkill(prepared.metadata, prepared.head, tuple(parts), id(self))

    def switch(self, skill: SwitchableSkill | None) -> None:
        """Hold ``skill`` (``None``: the base) from now on: the held skill's entries get their base values back, then
        ``skill``'s entries their values. Nothing else is written."""
        if skill is not None and skill.owner != id(self):
            raise StitchError(f"skill {skill.name!r} was prepared for another switcher; prepare it with this one.")
        if skill is self._held:
            return
        with torch.no_grad():
            if self._held is not None:
                for part in self._held.parts:
                    part.write(self._tensors[part.name].data.view(-1), part.base)
                self._held = None
            if skill is not None:
                self._held = skill  # first: an interrupted write is undone by the next switch (base where unwritten)
                for part in skill.parts:
                    part.write(self._tensors[part.name].data.view(-1), part.target)

    @contextmanager
    def active(self, skill: SwitchableSkill) -> Iterator[nn.Module]:
        """Context manager: the model holding ``skill`` with its head for the block, then what it held before."""
        before = self._held
        self.switch(skill)
        try:
            with use_head(self.model, skill.head) as model:
                yield model
        finally:
            self.switch(before)

    def use_head(self, skill: SwitchableSkill) -> AbstractContextManager[nn.Module]:
        """Context manager: the model with ``skill``'s head swapped in (hold the skill with :meth:`switch`)."""
        return use_head(self.model, skill.head)

    def _base_at(self, dst: str, indices: Tensor, live: Tensor) -> Tensor:
        """``live`` with the held skill's entries of tensor ``dst`` replaced by the base values it keeps."""
        held = next((part for part in self._held.parts if part.name == dst), None) if self._held is not None else None
        if held is None:
            return live
        held_indices, held_base = held.entries(), held.base.reshape(-1)
        at = torch.searchsorted(held_indices, indices).clamp(max=held_indices.numel() - 1)
        inside = held_indices.index_select(0, at) == indices
        return torch.where(inside, held_base.index_select(0, at), live)

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
cost, whatever the number of prepared skills.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from skillbank.errors import StitchError
from skillbank.stitching.heads import use_head
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.storage.skill import Skill, SkillMetadata
from skillbank.vectors.weights import WeightsSource

__all__ = ["SingleSkillSwitcher", "SwitchableSkill"]


@dataclass(frozen=True)
class SwitchableSkill:
    """A skill laid out for one :class:`SingleSkillSwitcher`: per tensor, flat indices, values to write, base values."""

    metadata: SkillMetadata
    head: dict[str, Tensor]
    parts: tuple[tuple[str, Tensor, Tensor, Tensor], ...]  # (tensor name, indices, base + τ, base), on the model's device
    owner: int

    @property
    def name(self) -> str:
        """The skill's name."""
        return self.metadata.name

    @property
    def nbytes(self) -> int:
        """Bytes it holds on the device (its head aside)."""
        return sum(t.numel() * t.element_size() for _, *tensors in self.parts for t in tensors)


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
                parts.append((dst, indices, target, base))
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
                for dst, indices, _, base in self._held.parts:
                    self._tensors[dst].data.view(-1).index_copy_(0, indices, base)
                self._held = None
            if skill is not None:
                self._held = skill  # first: an interrupted write is undone by the next switch (base where unwritten)
                for dst, indices, target, _ in skill.parts:
                    self._tensors[dst].data.view(-1).index_copy_(0, indices, target)

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
        held = next((part for part in self._held.parts if part[0] == dst), None) if self._held is not None else None
        if held is None:
            return live
        _, held_indices, _, held_base = held
        at = torch.searchsorted(held_indices, indices).clamp(max=held_indices.numel() - 1)
        inside = held_indices.index_select(0, at) == indices
        return torch.where(inside, held_base.index_select(0, at), live)

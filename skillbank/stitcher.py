"""``Stitcher``: apply and remove skills on a live model, incrementally and exactly.

``θ = θ_pre + Σ_i γ'_i ⊙ τ_i`` with overlaps averaged. For every entry covered
by at least one skill it keeps the base value, the running sum of τ (float64)
and the count of covering skills; adding or removing a skill rewrites only the
entries in that skill's mask, so every other entry stays bitwise identical, and
an entry no skill covers any more gets its stored base value back, bit for bit.

Position → slot lookup goes through one int32 map per touched tensor, so an add
costs O(skill size) whatever the number of skills already stitched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from skillbank.bank import SkillBank
from skillbank.errors import BaseMismatchError, StitchError
from skillbank.heads import use_head
from skillbank.skill import Region, Skill
from skillbank.weights import WeightsSource, align_names, fingerprint_from_digests, load_state_dict, tensor_digest

__all__ = ["Stitcher"]


class _Union:
    """Union-support state of one tensor: base value, τ sum and cover count per covered entry."""

    def __init__(self, tensor: Tensor) -> None:
        device = tensor.device
        self.slot = torch.full((tensor.numel(),), -1, dtype=torch.int32, device=device)
        self.base = torch.empty(0, dtype=tensor.dtype, device=device)
        self.total = torch.empty(0, dtype=torch.float64, device=device)
        self.count = torch.empty(0, dtype=torch.int32, device=device)
        self.size = 0

    def _reserve(self, extra: int) -> None:
        needed = self.size + extra
        if needed <= self.base.numel():
            return
        capacity = max(needed, 2 * self.base.numel())
        for attr in ("base", "total", "count"):
            old = getattr(self, attr)
            grown = torch.zeros(capacity, dtype=old.dtype, device=old.device)
            grown[: self.size] = old[: self.size]
            setattr(self, attr, grown)

    def add(self, flat: Tensor, idx: Tensor, values: Tensor) -> None:
        slots = self.slot[idx].long()
        new = slots < 0
        fresh = idx[new]
        if fresh.numel():
            self._reserve(fresh.numel())
            allocated = torch.arange(self.size, self.size + fresh.numel(), device=idx.device)
            self.base[allocated] = flat[fresh]
            self.slot[fresh] = allocated.int()
            slots[new] = allocated
            self.size += fresh.numel()
        self._write(flat, idx, slots, self.total[slots] + values.double(), self.count[slots] + 1)

    def remove(self, flat: Tensor, idx: Tensor, values: Tensor) -> None:
        slots = self.slot[idx].long()
        count = self.count[slots] - 1
        # An uncovered entry's sum is reset to exactly 0, so base + 0 restores the base bit for bit.
        total = torch.where(count == 0, 0.0, self.total[slots] - values.double())
        self._write(flat, idx, slots, total, count)

    def _write(self, flat: Tensor, idx: Tensor, slots: Tensor, total: Tensor, count: Tensor) -> None:
        self.total[slots] = total
        self.count[slots] = count
        flat[idx] = (self.base[slots].double() + total / count.clamp(min=1)).to(flat.dtype)

    def covered(self) -> int:
        return int((self.count[: self.size] > 0).sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slot, self.base, self.total, self.count))


@dataclass
class _Stitched:
    """What the stitcher remembers of one stitched skill."""

    names: dict[str, str]
    regions: dict[str, Region] | None  # None: re-read from the bank on removal
    sha256: str | None
    head: dict[str, Tensor]


class Stitcher:
    """Stitches skills onto ``model`` in place, one at a time, in any order.

    Args:
        model: the live model (or a ``{name: tensor}`` mapping, written in
            place), holding the base weights when the stitcher is made. It may wrap the base (``BertForSequenceClassification`` over a
            ``BertModel`` base): names are matched automatically.
        base: optional base weights (folder, file, module or state dict). When
            given, the model is checked against them now, and skills are
            checked against their fingerprint.
        bank: optional bank. Skills stitched by name are read from it and not
            kept in memory; removing them reads them again (checked by sha256).
            Skills passed as objects are kept in memory until removed.

    >>> import torch
    >>> from skillbank.skill import Region, Skill, SkillMetadata
    >>> from skillbank.weights import base_fingerprint
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> torch.nn.init.zeros_(model.weight)  # doctest: +ELLIPSIS
    Parameter containing:...
    >>> meta = lambda n: SkillMetadata(n, base_fingerprint(model.state_dict()), 0.5, {"weight": [2, 2]})
    >>> a = Skill(meta("a"), {"weight": Region(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))})
    >>> b = Skill(meta("b"), {"weight": Region(torch.tensor([1, 3]), torch.tensor([6.0, 1.0]))})
    >>> stitcher = Stitcher(model)
    >>> stitcher.add(a); stitcher.add(b)
    >>> model.weight.data.flatten().tolist()  # entry 1 is covered by both: (4 + 6) / 2
    [2.0, 5.0, 0.0, 1.0]
    >>> stitcher.remove("a"); model.weight.data.flatten().tolist()
    [0.0, 6.0, 0.0, 1.0]
    """

    def __init__(
        self, model: nn.Module | Mapping[str, Tensor], base: WeightsSource | None = None, *, bank: SkillBank | None = None
    ) -> None:
        self.model = model
        self.bank = bank
        tensors = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
        self._tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
        self._digests: dict[str, str] = {}
        self._unions: dict[str, _Union] = {}
        self._stitched: dict[str, _Stitched] = {}
        if base is not None:
            self._adopt_base(load_state_dict(base))

    # -- public ------------------------------------------------------------

    @property
    def stitched(self) -> list[str]:
        """Names of the stitched skills, in the order they were added."""
        return list(self._stitched)

    @property
    def heads(self) -> dict[str, dict[str, Tensor]]:
        """Each stitched skill's dense head, by skill name."""
        return {name: s.head for name, s in self._stitched.items()}

    @property
    def covered(self) -> int:
        """How many entries at least one stitched skill covers (the union support)."""
        return sum(u.covered() for u in self._unions.values())

    @property
    def state_nbytes(self) -> int:
        """Bytes of union-support state the stitcher holds (slot maps included)."""
        return sum(u.nbytes() for u in self._unions.values())

    def __contains__(self, name: object) -> bool:
        return name in self._stitched

    def __len__(self) -> int:
        return len(self._stitched)

    def add(self, skill: Skill | str) -> None:
        """Stitch ``skill`` (a :class:`Skill`, or a name read from the bank).

        Everything is checked before the model is touched: on any error the
        model is exactly as before the call.

        Raises:
            StitchError: already stitched, or the model lacks a parameter or has
                another shape, or the skill's entries are out of range or not finite.
            BaseMismatchError: the skill comes from another base model.
        """
        sha = None
        if isinstance(skill, str):
            sha = self._require_bank(skill).entry(skill).sha256
            skill = self._require_bank(skill).get(skill)
        if skill.name in self._stitched:
            raise StitchError(f"skill {skill.name!r} is already stitched; remove it first to re-apply it.")
        names = self._match(skill)
        self._check(skill, names)
        self._apply(skill.regions, names, _Union.add)
        self._stitched[skill.name] = _Stitched(
            names=names,
            regions=None if sha is not None else skill.regions,
            sha256=sha,
            head=skill.head,
        )

    def remove(self, name: str) -> None:
        """Take skill ``name`` out again; entries it alone covered return to the base bitwise."""
        if name not in self._stitched:
            raise StitchError(f"skill {name!r} is not stitched (stitched: {self.stitched or 'none'}).")
        record = self._stitched[name]
        regions = record.regions
        if regions is None:
            bank = self._require_bank(name)
            if bank.entry(name).sha256 != record.sha256:
                raise StitchError(f"skill {name!r} changed in the bank since it was stitched; cannot remove it exactly.")
            regions = bank.get(name).regions
        self._apply(regions, record.names, _Union.remove)
        del self._stitched[name]

    def use_head(self, name: str) -> AbstractContextManager[nn.Module]:
        """Context manager: the model with skill ``name``'s head swapped in."""
        if name not in self._stitched:
            raise StitchError(f"skill {name!r} is not stitched, so its head is not available.")
        if not isinstance(self.model, nn.Module):
            raise StitchError("heads can be swapped into an nn.Module only, not into a state dict.")
        return use_head(self.model, self._stitched[name].head)

    # -- internals ---------------------------------------------------------

    def _require_bank(self, name: str) -> SkillBank:
        if self.bank is None:
            raise StitchError(f"cannot load skill {name!r} by name: this stitcher has no bank (Stitcher(..., bank=...)).")
        return self.bank

    def _adopt_base(self, base: dict[str, Tensor]) -> None:
        base = {k: v for k, v in base.items() if v.is_floating_point()}
        names = align_names(base, self._tensors)
        for src, dst in names.items():
            live, ref = self._tensors[dst], base[src]
            if live.shape != ref.shape or not torch.equal(live.detach().cpu().to(ref.dtype), ref.detach().cpu()):
                raise BaseMismatchError(
                    f"the model's {dst!r} differs from the base's {src!r}: stitching must start from the base weights "
                    "(load the base model, not a finetuned or already-stitched one)."
                )
            self._digests[dst] = tensor_digest(ref)

    def _match(self, skill: Skill) -> dict[str, str]:
        shapes = skill.metadata.shapes
        names = align_names(shapes, self._tensors)
        missing = sorted(set(shapes) - set(names))
        if missing:
            raise StitchError(
                f"skill {skill.name!r} needs parameters the model does not have: {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''}; is this the architecture the skill was made for?"
            )
        for src, dst in names.items():
            if list(self._tensors[dst].shape) != list(shapes[src]):
                raise StitchError(
                    f"skill {skill.name!r}: {src!r} has shape {list(shapes[src])} in the skill but "
                    f"{list(self._tensors[dst].shape)} in the model ({dst!r})."
                )
        return names

    def _check(self, skill: Skill, names: dict[str, str]) -> None:
        for src, region in skill.regions.items():
            if src not in names:
                raise StitchError(f"skill {skill.name!r} has a region for {src!r}, which its header does not list.")
            if not len(region):
                continue
            tensor = self._tensors[names[src]]
            if not tensor.is_contiguous():
                raise StitchError(f"{names[src]!r} is not contiguous; stitching writes into a flat view of it.")
            if region.values.numel() != region.indices.numel():
                raise StitchError(f"skill {skill.name!r}: {src!r} has {len(region)} indices but {region.values.numel()} values.")
            if int(region.indices.min()) < 0 or int(region.indices.max()) >= tensor.numel():
                raise StitchError(f"skill {skill.name!r}: indices of {src!r} fall outside its {tensor.numel()} entries.")
            if not bool(torch.isfinite(region.values).all()):
                raise StitchError(f"skill {skill.name!r} has NaN/Inf values in {src!r}; it cannot be stitched.")
        digests = {}
        for src, dst in names.items():
            if dst not in self._digests:  # first use: the tensor still holds its base value
                self._digests[dst] = tensor_digest(self._tensors[dst])
            digests[src] = self._digests[dst]
        if fingerprint_from_digests(digests) != skill.metadata.base_fingerprint:
            raise BaseMismatchError(
                f"skill {skill.name!r} was localized on another base model than the one this model started from "
                "(base fingerprints differ); stitch it onto its own base."
            )

    def _apply(self, regions: Mapping[str, Region], names: Mapping[str, str], step) -> None:  # noqa: ANN001
        with torch.no_grad():
            for src, region in regions.items():
                if not len(region):
                    continue
                dst = names[src]
                tensor = self._tensors[dst]
                union = self._unions.get(dst)
                if union is None:
                    union = self._unions[dst] = _Union(tensor)
                flat = tensor.data.view(-1)
                step(union, flat, region.indices.to(flat.device), region.values.to(flat.device))

    def __iter__(self) -> Iterator[str]:
        return iter(self.stitched)

"""``Stitcher``: apply and remove skills on a live model, incrementally and exactly.

``θ = θ_pre + Σ_i γ'_i ⊙ τ_i`` with overlaps averaged (or combined by another
:mod:`overlap rule <skillbank.stitching.overlap>`). For every entry covered by at least one
skill it keeps the base value, the count of covering skills and the rule's
running accumulators (float64; the mean's is the sum of τ); adding or removing a
skill rewrites only the entries in that skill's mask, so every other entry stays
bitwise identical, and an entry no skill covers any more gets its stored base
value back, bit for bit.

All float tensors share one flat address space; the covered entries' rows are
found through a hash table over it (:mod:`skillbank.stitching.union_support`), so an add
costs O(skill size) whatever the number of skills already stitched, the state
follows the covered entries (nothing is held for the rest of the model), and
each tensor sees one gather and one scatter per skill.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from skillbank.errors import BaseMismatchError, SkillFileError, SkillNameError, StitchError
from skillbank.stitching import multi_tensor
from skillbank.stitching.heads import use_head
from skillbank.stitching.overlap import OverlapRule, get_rule
from skillbank.stitching.union_support import UnionSupport
from skillbank.storage.bank import SkillBank
from skillbank.storage.skill import Region, Skill, SkillMetadata
from skillbank.vectors.weights import WeightsSource, align_names, fingerprint_from_digests, load_weights, tensor_digest

__all__ = ["PreparedSkill", "Stitcher"]


def _per_entry(per_span: list[int], spans: list[tuple[str, int, int]], total: int, device: torch.device) -> Tensor:
    """Spread one value per span over its entries (a cumsum of jumps: far faster than repeat_interleave on CPU)."""
    jumps = torch.zeros(total, dtype=torch.int64, device=device)
    if spans:
        steps = [now - before for before, now in zip([0, *per_span], per_span)]
        jumps[torch.tensor([s for _, s, _ in spans], device=device)] = torch.tensor(steps, dtype=torch.int64, device=device)
    return jumps.cumsum(0)


class _PerTensor:
    """Reads and writes a batch's entries one tensor at a time (``index_select`` / ``index_copy_``)."""

    def __init__(self, flats: list[tuple[Tensor, Tensor, int, int]]) -> None:
        self.flats = flats  # (the tensor's flat view, its local indices, start in the batch, count)

    def read(self, fresh: Tensor) -> Tensor:
        """Live values (float64) at the batch positions ``fresh`` (ascending)."""
        total = sum(n for _, _, _, n in self.flats)
        if fresh.numel() == total:
            return torch.cat([flat.index_select(0, idx).double() for flat, idx, _, _ in self.flats])
        cuts = torch.tensor([s for _, _, s, _ in self.flats] + [total], device=fresh.device)
        bounds = torch.searchsorted(fresh, cuts).tolist()
        return torch.cat(
            [
                flat.index_select(0, idx.index_select(0, fresh[lo:hi] - start)).double()
                for (flat, idx, start, _), lo, hi in zip(self.flats, bounds, bounds[1:])
            ]
        )

    def write(self, values: Tensor) -> None:
        """Write the batch's ``values`` (float64), each cast to its tensor's dtype."""
        for flat, idx, start, n in self.flats:
            flat.index_copy_(0, idx, values[start : start + n].to(flat.dtype))


class _OneLaunch:
    """Reads and writes a batch's entries in all its tensors with one kernel each (:mod:`skillbank.stitching.multi_tensor`)."""

    def __init__(self, table: Tensor, placed: _Placed, dtype: torch.dtype) -> None:
        assert placed.ids is not None
        self.table, self.ids, self.positions, self.dtype = table, placed.ids, placed.positions, dtype

    def read(self, fresh: Tensor) -> Tensor:
        return multi_tensor.gather(self.table, self.ids, self.positions, fresh, self.dtype).double()

    def write(self, values: Tensor) -> None:
        # cast by torch, as the per-tensor path does, then moved as raw words: the same bits land
        multi_tensor.scatter(self.table, self.ids, self.positions, values.to(self.dtype))


@dataclass
class _Placed:
    """A batch on the model's device: local indices, values, global flat positions and tensor numbers per entry."""

    local: Tensor
    values: Tensor
    positions: Tensor
    ids: Tensor | None  # only where the one-launch path serves the batch


@dataclass
class _Batch:
    """One skill's entries, concatenated: ``spans`` are (tensor name, start, length) into ``local``/``values``."""

    spans: list[tuple[str, int, int]]
    local: Tensor
    values: Tensor
    name: str = ""
    placed: _Placed | None = None  # kept by a PreparedSkill, so its adds and removes skip the layout work


@dataclass(frozen=True)
class PreparedSkill:
    """A skill checked against one :class:`Stitcher`'s model and laid out on its device (:meth:`Stitcher.prepare`).

    Adding or removing it does only the stitching itself: no bank read, no
    checks, no copy to the device. Holds about 24 bytes per entry there.
    """

    metadata: SkillMetadata
    head: dict[str, Tensor]
    sha256: str | None  # the bank copy's, when prepared by name
    names: dict[str, str]
    batch: _Batch
    owner: int  # id() of the stitcher it was prepared for

    @property
    def name(self) -> str:
        """The skill's name."""
        return self.metadata.name


@dataclass
class _Stitched:
    """What the stitcher remembers of one stitched skill."""

    names: dict[str, str]
    skill: Skill | None  # None: re-read from the bank on removal (or on a switch back)
    sha256: str | None
    head: dict[str, Tensor]
    metadata: SkillMetadata
    prepared: PreparedSkill | None = None  # its entries stay laid out on the device


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
        rule: how overlapping skills combine: ``"mean"`` (the paper's, default),
            ``"sum"``, ``"sign_mean"`` (TIES-style), or an
            :class:`~skillbank.stitching.overlap.OverlapRule`; see :mod:`skillbank.stitching.overlap`.

    Skills are written on the model's device and in its dtype (its state lives
    there too); :meth:`prepare` places a skill there ahead of time.

    >>> import torch
    >>> from skillbank.storage.skill import Region, Skill, SkillMetadata
    >>> from skillbank.vectors.weights import base_fingerprint
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
        self,
        model: nn.Module | Mapping[str, Tensor],
        base: WeightsSource | None = None,
        *,
        bank: SkillBank | None = None,
        rule: str | OverlapRule = "mean",
    ) -> None:
        self.model = model
        self.bank = bank
        self.rule = get_rule(rule)
        tensors = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
        self._tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
        sizes = [t.numel() for t in self._tensors.values()]
        self._sizes = dict(zip(self._tensors, sizes))
        self._offsets = dict(zip(self._tensors, itertools.accumulate([0, *sizes[:-1]])))
        self._numel = sum(sizes)
        self._ids = {name: i for i, name in enumerate(self._tensors)}
        self._addresses = multi_tensor.AddressTable(list(self._tensors.values()), list(self._offsets.values()))
        self._digests: dict[str, str] = {}
        self._names: dict[tuple[str, ...], dict[str, str]] = {}
        self._union: UnionSupport | None = None
        self._stitched: dict[str, _Stitched] = {}
        if base is not None:
            self._adopt_base(load_weights(base))

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
    def metadata(self) -> dict[str, SkillMetadata]:
        """Each stitched skill's metadata, by skill name (kept also for skills read from the bank)."""
        return {name: s.metadata for name, s in self._stitched.items()}

    @property
    def covered(self) -> int:
        """How many entries at least one stitched skill covers (the union support)."""
        return self._union.covered() if self._union is not None else 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of union-support state the stitcher holds (rows of the covered entries and their hash table)."""
        return self._union.nbytes() if self._union is not None else 0

    def base_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{tensor name: (flat indices, base values)}`` of every entry a skill has touched.

        Everywhere else the model holds its base already, so writing these back
        returns a stitched model (say, one restored from a checkpoint) to its base
        bit for bit, e.g. to stitch the same skills again with a new ``Stitcher``.
        """
        if self._union is None:
            return {}
        positions, values = self._union.touched()
        out = {}
        for name, tensor in self._tensors.items():
            start = self._offsets[name]
            lo, hi = torch.searchsorted(
                positions, torch.tensor([start, start + tensor.numel()], device=positions.device)
            ).tolist()
            if hi > lo:
                out[name] = ((positions[lo:hi] - start).cpu(), values[lo:hi].to(tensor.dtype).cpu())
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._stitched

    def __len__(self) -> int:
        return len(self._stitched)

    def add(self, skill: Skill | str | PreparedSkill) -> None:
        """Stitch ``skill`` (a :class:`Skill`, a name read from the bank, or one :meth:`prepare` returned).

        Everything is checked before the model is touched: on any error the
        model is exactly as before the call.

        Raises:
            StitchError: already stitched, or the model lacks a parameter or has
                another shape, or the skill's entries are out of range or not finite.
            BaseMismatchError: the skill comes from another base model.
        """
        name = _name_of(skill)
        if name in self._stitched:
            raise StitchError(f"skill {name!r} is already stitched; remove it first to re-apply it.")
        if isinstance(skill, PreparedSkill):
            if skill.owner != id(self):
                raise StitchError(f"skill {name!r} was prepared for another Stitcher; prepare it with this one.")
            prepared, kept, sha, names, batch, head, metadata = (
                skill,
                None,
                skill.sha256,
                skill.names,
                skill.batch,
                skill.head,
                skill.metadata,
            )
        else:
            kept, sha, names, batch = self._checked(skill)
            prepared, head, metadata = None, kept.head, kept.metadata
        self._apply(batch, adding=True)
        self._stitched[name] = _Stitched(
            names=names, skill=None if sha is not None else kept, sha256=sha, head=head, metadata=metadata, prepared=prepared
        )

    def prepare(self, skill: Skill | str, *, place: bool = True) -> PreparedSkill:
        """Check ``skill`` against this model and lay its entries out on the model's device, once.

        ``add(prepared)``, its removal and switches to it then do only the
        stitching: no bank read, no checks, no copy to the device (on a GPU, what
        makes an add take about a millisecond). Holds about 24 bytes per entry on
        the device for as long as it is kept. ``place=False``: checked only, its
        entries left on the CPU and out of the union table's layout (for a caller
        that writes them itself, as :class:`~skillbank.SingleSkillSwitcher` does;
        an add of it lays them out then).
        """
        kept, sha, names, batch = self._checked(skill)
        if batch.spans and place:
            placed = self._place(batch, self._device_of(batch), self._one_launch(batch))
            batch = _Batch(batch.spans, placed.local, placed.values, batch.name, placed)
        return PreparedSkill(kept.metadata, kept.head, sha, names, batch, id(self))

    def remove(self, name: str) -> None:
        """Take skill ``name`` out again; entries it alone covered return to the base bitwise."""
        if name not in self._stitched:
            raise StitchError(f"skill {name!r} is not stitched (stitched: {self.stitched or 'none'}).")
        record = self._stitched[name]
        if record.prepared is not None:
            batch = record.prepared.batch
        else:
            regions = record.skill.regions if record.skill is not None else self._banked(name, record.sha256).regions
            batch = self._flatten(name, regions, record.names)
        self._apply(batch, adding=False)
        del self._stitched[name]

    def switch(self, skills: Sequence[Skill | str | PreparedSkill]) -> None:
        """Hold exactly ``skills`` from now on (names are read from the bank; order is the add order).

        Skills not named are removed, named ones not yet stitched are added; only the
        entries of the skills that leave or arrive are rewritten, and every entry no
        remaining skill covers gets its base value back bit for bit. ``switch([])``
        returns the model to the base. Prepared skills (:meth:`prepare`) switch fastest.

        Raises:
            StitchError: a name repeats, or a skill cannot be added or removed (the
                model then holds what the last completed step left: every skill
                removed so far is out, every one added so far is in).
        """
        wanted = [_name_of(s) for s in skills]
        if len(set(wanted)) != len(wanted):
            raise StitchError(f"skill names repeat in {wanted}.")
        for name in [n for n in self.stitched if n not in wanted]:
            self.remove(name)
        for skill in skills:
            if _name_of(skill) not in self._stitched:
                self.add(skill)

    @contextmanager
    def active(self, *skills: Skill | str | PreparedSkill, head: bool = True) -> Iterator[nn.Module | Mapping[str, Tensor]]:
        """Context manager: the model holding exactly ``skills`` for the block, then what it held before.

        With one skill and ``head=True`` that skill's head is swapped in too, so
        ``with stitcher.active("sst2") as m: m(**batch)`` answers with sst2's own
        model. Switching in and back rewrites only the masks involved, both ways.
        """
        before: list[Skill | str | PreparedSkill] = [
            record.prepared if record.prepared is not None else record.skill if record.skill is not None else name
            for name, record in self._stitched.items()
        ]
        self.switch(skills)
        try:
            if head and len(skills) == 1 and isinstance(self.model, nn.Module):
                name = _name_of(skills[0])
                with use_head(self.model, self._stitched[name].head) as model:
                    yield model
            else:
                yield self.model
        finally:
            self.switch(before)

    def use_head(self, name: str) -> AbstractContextManager[nn.Module]:
        """Context manager: the model with skill ``name``'s head swapped in."""
        if name not in self._stitched:
            raise StitchError(f"skill {name!r} is not stitched, so its head is not available.")
        if not isinstance(self.model, nn.Module):
            raise StitchError("heads can be swapped into an nn.Module only, not into a state dict.")
        return use_head(self.model, self._stitched[name].head)

    # -- internals ---------------------------------------------------------

    def reset(self) -> None:
        """Put the base back, bit for bit, in every entry any skill touched, and forget every stitched skill.

        Always possible, whatever happened to the bank since: the base values of
        touched entries live in the stitcher. The way out when a skill cannot be
        removed exactly because its copy in the bank changed or vanished.
        """
        with torch.no_grad():
            for name, (indices, values) in self.base_values().items():
                tensor = self._tensors[name]
                tensor.data.view(-1).index_copy_(0, indices.to(tensor.device), values.to(tensor.device))
        self._union = None
        self._stitched.clear()

    def _checked(self, skill: Skill | str) -> tuple[Skill, str | None, dict[str, str], _Batch]:
        """``skill`` (read from the bank when named), its bank sha256, its names in the model, and its checked batch."""
        sha = None
        if isinstance(skill, str):
            bank = self._require_bank(skill)
            sha = bank.entry(skill).sha256
            skill = bank.get(skill)
        if skill.low_rank:
            raise StitchError(
                f"skill {skill.name!r} carries low-rank parts of {len(skill.low_rank)} weight matrices, dense over each: "
                "compose it matrix by matrix (rule 'tsv_m', 'iso_c' or 'iso_cts'; SpectralStitcher), not entry by entry."
            )
        names = self._match(skill)
        batch = self._flatten(skill.name, skill.regions, names)
        self._check_base(skill, names)
        return skill, sha, names, batch

    def _banked(self, name: str, sha256: str | None) -> Skill:
        """Skill ``name`` as it was stitched, read from the bank again (checked by sha256)."""
        bank = self._require_bank(name)
        way_out = (
            "the stitcher cannot subtract it exactly; stitcher.reset() puts the base back (then add the "
            "skills you want again), or keep Skill objects: Stitcher.add(bank.get(name)) keeps the skill in memory."
        )
        try:
            entry = bank.entry(name)
        except SkillNameError:
            raise StitchError(f"skill {name!r} was removed from the bank since it was stitched: {way_out}") from None
        if entry.sha256 != sha256:
            raise StitchError(f"skill {name!r} changed in the bank since it was stitched: {way_out}")
        try:
            return bank.get(name)
        except SkillFileError as exc:
            raise StitchError(f"skill {name!r} can no longer be read from the bank ({exc}): {way_out}") from None

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
        key = tuple(shapes)
        if key not in self._names:  # skills of one base share their layout: match names once
            self._names[key] = align_names(shapes, self._tensors)
        names = self._names[key]
        missing = sorted(set(shapes) - set(names))
        if missing:
            raise StitchError(
                f"skill {skill.name!r} needs parameters the model does not have: {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''}; is this the architecture the skill was made for?"
            )
        for src, dst in names.items():
            tensor = self._tensors[dst]
            if list(tensor.shape) != list(shapes[src]):
                raise StitchError(
                    f"skill {skill.name!r}: {src!r} has shape {list(shapes[src])} in the skill but "
                    f"{list(tensor.shape)} in the model ({dst!r}); stitch it onto the architecture it was localized on."
                )
            expected = skill.metadata.dtypes.get(src)
            if expected is not None and str(tensor.dtype) != expected:
                raise StitchError(
                    f"skill {skill.name!r} was localized on a {expected} base but the model's {dst!r} is "
                    f"{tensor.dtype}; load the model in {expected.replace('torch.', '')} (e.g. torch_dtype=...) to stitch it."
                )
        return names

    def _check_base(self, skill: Skill, names: dict[str, str]) -> None:
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

    def _flatten(self, skill: str, regions: Mapping[str, Region], names: Mapping[str, str]) -> _Batch:
        """Concatenate a skill's regions into one batch, checking them all in a few vector ops."""
        spans, start = [], 0
        for src, region in regions.items():
            if src not in names:
                raise StitchError(f"skill {skill!r} has a region for {src!r}, which its header does not list.")
            if region.values.numel() != region.indices.numel():
                raise StitchError(f"skill {skill!r}: {src!r} has {len(region)} indices but {region.values.numel()} values.")
            if len(region):
                if not self._tensors[names[src]].is_contiguous():
                    raise StitchError(f"{names[src]!r} is not contiguous; stitching writes into a flat view of it.")
                spans.append((names[src], start, len(region)))
                start += len(region)
        parts = [r for r in regions.values() if len(r)]
        on = parts[0].indices.device if parts else torch.device("cpu")  # where the skill is held: the CPU, mostly
        local = (
            torch.cat([r.indices.reshape(-1) for r in parts]).to(torch.int64)
            if parts
            else torch.empty(0, dtype=torch.int64, device=on)
        )
        values = torch.cat([r.values.reshape(-1) for r in parts]).float() if parts else torch.empty(0, device=on)
        # Strictly ascending within each span, so its first and last index bound all of it.
        ascending = torch.ones(local.numel(), dtype=torch.bool, device=on)  # a span's first entry is free
        ascending[1:] = local[1:] > local[:-1]
        firsts = torch.tensor([s for _, s, _ in spans], dtype=torch.int64, device=on)
        ascending[firsts] = True
        lasts = firsts + torch.tensor([n - 1 for _, _, n in spans], dtype=torch.int64, device=on)
        numels = torch.tensor([self._tensors[d].numel() for d, _, _ in spans], dtype=torch.int64, device=on)
        in_range = (local[firsts] >= 0) & (local[lasts] < numels) if spans else torch.ones(0, dtype=torch.bool, device=on)
        ordered = bool(ascending.all())
        if not (ordered and bool(in_range.all())):
            at = int(torch.nonzero(~ascending)[0]) if not ordered else int(firsts[torch.nonzero(~in_range)[0]])
            dst = next(d for d, s, n in spans if s <= at < s + n)
            raise StitchError(
                f"skill {skill!r}: indices of {dst!r} fall outside its {self._tensors[dst].numel()} entries "
                "or are not strictly ascending; the skill is damaged."
            )
        if not bool(torch.isfinite(values).all()):
            at = int(torch.nonzero(~torch.isfinite(values))[0])
            dst = next(d for d, s, n in spans if s <= at < s + n)
            raise StitchError(f"skill {skill!r} has NaN/Inf values in {dst!r}; it cannot be stitched.")
        return _Batch(spans, local, values, skill)

    def _device_of(self, batch: _Batch) -> torch.device:
        """The one device of the batch's tensors, checked to have kept their size and layout since the stitcher
        was made (a prepared batch's positions, and the one-launch path's addresses, rely on both)."""
        device = self._tensors[batch.spans[0][0]].device
        for dst, _, _ in batch.spans:
            tensor = self._tensors[dst]
            if tensor.device != device:
                raise StitchError("stitching needs every tensor of a skill on one device; move the model first.")
            if tensor.numel() != self._sizes[dst] or not tensor.is_contiguous():
                raise StitchError(
                    f"{dst!r} changed size or layout since this Stitcher was made; make a new Stitcher "
                    "(after putting the base back) for the changed model."
                )
        return device

    def _one_launch(self, batch: _Batch) -> bool:
        """Whether the batch's tensors take the one-launch gather/scatter (CUDA, one dtype, Triton)."""
        return multi_tensor.enabled([self._tensors[dst] for dst, _, _ in batch.spans])

    def _place(self, batch: _Batch, device: torch.device, one_launch: bool) -> _Placed:
        """The batch on ``device``, with each entry's global flat position (and tensor number, for one launch)."""
        local = batch.local.to(device)  # one transfer per skill
        values = batch.values.to(device)
        positions = local + _per_entry([self._offsets[d] for d, _, _ in batch.spans], batch.spans, local.numel(), device)
        ids = None
        if one_launch:
            ids = _per_entry([self._ids[d] for d, _, _ in batch.spans], batch.spans, local.numel(), device).int()
        return _Placed(local, values, positions, ids)

    def _apply(self, batch: _Batch, *, adding: bool) -> None:
        if not batch.spans:
            return
        device = self._device_of(batch)
        if self._union is None:
            wide = any(t.dtype == torch.float64 for t in self._tensors.values())
            self._union = UnionSupport(self._numel, device, self.rule, torch.float64 if wide else torch.float32)
        one_launch = self._one_launch(batch)
        placed = batch.placed
        if placed is None or placed.positions.device != device or (one_launch and placed.ids is None):
            placed = self._place(batch, device, one_launch)
        with torch.no_grad():
            writer: _PerTensor | _OneLaunch
            if one_launch:
                dtype = self._tensors[batch.spans[0][0]].dtype
                table = self._addresses.current(device, dtype.itemsize)
                writer = _OneLaunch(table, placed, dtype)
            else:
                writer = _PerTensor(
                    [
                        (self._tensors[dst].data.view(-1), placed.local[start : start + n], start, n)
                        for dst, start, n in batch.spans
                    ]
                )
            plan = self._union.plan(placed.positions, placed.values, 1 if adding else -1, writer.read)
            self._check_fits(batch, plan.merged)
            try:
                writer.write(plan.merged)
            except BaseException:  # an interrupt mid-write: put every touched entry back
                writer.write(self._union.before(plan))
                raise
            self._union.commit(plan)

    def _check_fits(self, batch: _Batch, merged: Tensor) -> None:
        """Refuse values that are NaN or overflow the dtype they are written in (one vector op when dtypes agree)."""
        dtypes = [self._tensors[dst].dtype for dst, _, _ in batch.spans]
        if len(set(dtypes)) == 1 and bool((merged.abs() <= torch.finfo(dtypes[0]).max).all()):
            return
        for (dst, start, n), dtype in zip(batch.spans, dtypes):
            if not bool((merged[start : start + n].abs() <= torch.finfo(dtype).max).all()):
                raise StitchError(
                    f"stitching {batch.name!r} would write values that overflow {dtype} in {dst!r} "
                    "(NaN/Inf); the model is unchanged. Load the model in a wider dtype (float32)."
                )

    def __iter__(self) -> Iterator[str]:
        return iter(self.stitched)


def _name_of(skill: Skill | str | PreparedSkill) -> str:
    return skill if isinstance(skill, str) else skill.name

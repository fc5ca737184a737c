"""``SpectralStitcher``: skills stitched so that each weight matrix is composed by TSV-M, Iso-C or Iso-CTS.

Every other tensor (biases, LayerNorms, embeddings) is stitched by an inner :class:`Stitcher` with the
``mean`` rule, exactly and incrementally. A weight matrix is recomputed whenever a skill touching it arrives
or leaves: ``base + scale · merge(the dense τ of the skills touching it, in name order)`` (under Iso-C and
Iso-CTS, a matrix one skill alone touches is ``base + τ``, as that skill alone gives it) — exact,
deterministic and independent of arrival order (it is a function of the set of skills), but it rewrites
the whole matrix, not only the new skill's entries. What holds as for the overlap rules: checks before any
write (a refused skill leaves the model as it was), removing every skill gives back the base bit for bit
(the base of each touched matrix is kept), each skill's head. What is replaced: "an add writes only that
skill's entries" becomes "an add recomputes the matrices it touches, from every stitched skill".

>>> import torch
>>> from skillbank.storage.skill import Region, Skill, SkillMetadata
>>> from skillbank.vectors.weights import base_fingerprint
>>> model = {"layer.weight": torch.zeros(2, 2), "layer.bias": torch.zeros(2)}
>>> meta = lambda n: SkillMetadata(n, base_fingerprint(model), 0.5, {"layer.weight": [2, 2], "layer.bias": [2]})
>>> a = Skill(meta("a"), {"layer.weight": Region(torch.tensor([0]), torch.tensor([4.0])),
...                       "layer.bias": Region(torch.tensor([0]), torch.tensor([1.0]))})
>>> b = Skill(meta("b"), {"layer.weight": Region(torch.tensor([3]), torch.tensor([2.0])),
...                       "layer.bias": Region(torch.tensor([0]), torch.tensor([3.0]))})
>>> stitcher = SpectralStitcher(model, merge="tsv_m")
>>> stitcher.add(a); stitcher.add(b)
>>> model["layer.weight"].tolist(), model["layer.bias"].tolist()
([[4.0, 0.0], [0.0, 2.0]], [2.0, 0.0])
>>> stitcher.remove("a"); stitcher.remove("b"); model["layer.weight"].abs().sum().item()
0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace

import torch
from torch import Tensor, nn

from skillbank.errors import StitchError
from skillbank.stitching.calibration import Calibration, learn_part_weights
from skillbank.stitching.spectral import SpectralComposition, compose_spectral, tsv_skill_parts
from skillbank.stitching.stitcher import Stitcher
from skillbank.storage.bank import SkillBank
from skillbank.storage.skill import Region, Skill, SkillMetadata
from skillbank.vectors.spectral import MATRIX_MERGES, Factors, is_weight_matrix
from skillbank.vectors.weights import WeightsSource, align_names

__all__ = ["SpectralStitcher"]


class SpectralStitcher:
    """Stitches skills onto ``model`` in place, each weight matrix composed by a spectral merge of the skills
    touching it, every other tensor by the ``mean`` rule.

    Args:
        model: the live model (or a ``{name: tensor}`` mapping), holding the base weights when made.
        base: optional base weights to check the model against (as :class:`Stitcher`).
        bank: optional bank to read skills named by name from.
        merge: ``"tsv_m"`` (default), ``"iso_c"`` or ``"iso_cts"``
            (:data:`~skillbank.vectors.spectral.MATRIX_MERGES`).
        scale: the matrices' composed ``τ`` is multiplied by it (chosen on validation data: 1.5–2.5 on the real
            benchmark).

    Skills' matrix regions are held in memory while stitched (a matrix is recomputed from all of them).
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, Tensor],
        base: WeightsSource | None = None,
        *,
        bank: SkillBank | None = None,
        merge: str = "tsv_m",
        scale: float = 1.0,
    ) -> None:
        self.merge = MATRIX_MERGES[merge].name  # an unknown name is refused now
        if not math.isfinite(scale) or scale <= 0:
            raise StitchError(f"scale must be a positive number, got {scale}.")
        self.model, self.bank, self.scale = model, bank, float(scale)
        self._inner = Stitcher(model, base, rule="mean")  # every tensor but the matrices; checks bases and shapes
        tensors = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
        self._tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
        self._matrices: dict[str, Skill] = {}  # each stitched skill's regions in weight matrices (all are kept)
        self._skills: dict[str, Skill] = {}  # each stitched skill whole (the teacher of a calibration)
        self._base: dict[str, Tensor] = {}  # model tensor name -> its base value, while a skill touches it
        self._units: dict[str, tuple[Tensor, bool]] | None = None  # after a rescale: each touched matrix's composition
        # at scale 1, and whether the scale multiplies it
        self._factors: dict[tuple[str, str], Factors] = {}  # TSV-M: each (skill, matrix)'s kept singular triplets
        self.calibration: Calibration | None = None  # what calibrate() learned, until the next add or remove

    @property
    def stitched(self) -> list[str]:
        """Names of the stitched skills, in the order they were added."""
        return self._inner.stitched

    @property
    def heads(self) -> dict[str, dict[str, Tensor]]:
        """Each stitched skill's dense head, by skill name."""
        return self._inner.heads

    @property
    def metadata(self) -> dict[str, SkillMetadata]:
        """Each stitched skill's metadata, by skill name."""
        return self._inner.metadata

    def base_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{tensor name: (flat indices, base values)}`` of every entry a skill touches (a touched matrix whole), so
        writing them back returns the model to its base bit for bit (as :meth:`Stitcher.base_values`)."""
        out = self._inner.base_values()
        for dst, value in self._base.items():
            out[dst] = (torch.arange(value.numel(), device="cpu"), value.detach().reshape(-1).cpu().clone())
        return out

    def use_head(self, name: str) -> AbstractContextManager[nn.Module]:
        """Context manager: the model with skill ``name``'s head swapped in."""
        return self._inner.use_head(name)

    def __contains__(self, name: object) -> bool:
        return name in self._inner

    def __len__(self) -> int:
        return len(self._inner)

    def add(self, skill: Skill | str) -> None:
        """Stitch ``skill`` (or the bank's skill of that name); every check comes before the model is touched.

        Raises:
            StitchError, BaseMismatchError: as :meth:`Stitcher.add`, and for a matrix region whose indices are out
                of range or not ascending, or whose values are not finite.
        """
        if isinstance(skill, str):
            if self.bank is None:
                raise StitchError(f"cannot load skill {skill!r} by name: this stitcher has no bank (bank=...).")
            skill = self.bank.get(skill)
        if skill.name in self._inner:
            raise StitchError(f"skill {skill.name!r} is already stitched; remove it first to re-apply it.")
        matrices, rest = self._split(skill)
        self._inner.add(rest)  # checks names, shapes and the base fingerprint of the whole skill's header
        try:
            composed = self._composed({**self._matrices, skill.name: matrices}, matrices.regions)
        except BaseException:
            self._inner.remove(skill.name)  # exact: the mean rule takes a skill out bit for bit
            raise
        self._matrices[skill.name] = matrices
        self._skills[skill.name] = skill
        self._write(composed, matrices.regions)
        self._uncalibrate()

    def remove(self, name: str) -> None:
        """Take skill ``name`` out: the other tensors by the mean rule, its matrices recomputed from the others."""
        if name not in self._matrices:
            self._inner.remove(name)  # names the error
        touched = self._matrices[name].regions
        composed = self._composed({n: s for n, s in self._matrices.items() if n != name}, touched)
        self._inner.remove(name)
        del self._matrices[name], self._skills[name]
        for key in [k for k in self._factors if k[0] == name]:
            del self._factors[key]
        self._write(composed, touched)
        self._uncalibrate()

    def reset(self) -> None:
        """Put the base back, bit for bit, and forget every stitched skill."""
        self._inner.reset()
        with torch.no_grad():
            for dst, value in self._base.items():
                self._tensors[dst].data.copy_(value)
        self._base.clear()
        self._units = None
        self._factors.clear()
        self._matrices.clear()
        self._skills.clear()
        self.calibration = None

    def rescale(self, scale: float) -> None:
        """Write every stitched matrix again at ``scale`` (e.g. one chosen on validation after an arrival).

        The model then holds exactly what a stitcher made at ``scale`` with the same skills holds, bit for bit, so
        add and remove stay exact. The first call composes every matrix a stitched skill touches once, at scale 1,
        and keeps those compositions (one float32 copy of each touched matrix, until :meth:`reset`), so further
        calls, and adds and removes, only rewrite: a sweep over scales costs one composition. A calibration is
        dropped, as by :meth:`add`.

        Raises:
            StitchError: ``scale`` is not a positive finite number (nothing changes).
        """
        if not math.isfinite(scale) or scale <= 0:
            raise StitchError(f"scale must be a positive number, got {scale}.")
        touched = self._touched()
        if self._units is None:
            composed = self._composed(self._matrices, touched)  # may fail: nothing has changed yet
            self._units = {}
        else:
            kept = {src: unit for src, unit in self._units.items() if src in touched}
            composed = SpectralComposition(
                {src: u for src, (u, _) in kept.items()}, frozenset(src for src, (_, scaled) in kept.items() if scaled)
            )
        self.scale = float(scale)
        self.calibration = None
        self._write(composed, touched)

    def calibrate(
        self, *, loss: str = "distill", per: str = "layer", steps: int = 30, lr: float = 0.02, batch_size: int = 32
    ) -> Calibration:
        """Weigh each stitched skill's part of every weight matrix (per layer, or per skill) on the examples the
        skills keep, and write the weighted composition (TSV-M only: its parts add up to it). Every stitched skill
        must keep examples (``skillbank localize --keep-examples``); see :mod:`skillbank.stitching.calibration`
        for the losses. The weights hold until the next :meth:`add` or :meth:`remove`, which recompose every
        matrix without them (the composition stays a function of the set of skills); :attr:`calibration` keeps
        what was learned. Costs one dense part per skill and matrix in memory while it learns.

        Raises:
            StitchError: another merge than ``tsv_m``, a model given as a mapping, no skills, skills without
                examples, or bad settings (:func:`~skillbank.stitching.calibration.learn_part_weights`).
        """
        if self.merge != "tsv_m":
            raise StitchError(f"calibration weighs TSV-M's per-skill parts; this stitcher composes by {self.merge!r}.")
        if not isinstance(self.model, nn.Module):
            raise StitchError("calibration runs the model on the skills' examples: give the stitcher an nn.Module.")
        self._uncalibrate()
        skills = {n: s for n, s in self._matrices.items() if any(map(s.touches, s.regions))}
        touched = {t for s in self._skills.values() for t in s.regions if s.touches(t)}
        names = align_names(touched, self._tensors)
        base = self._base_tensors(names)
        parts = {
            n: {names[t]: self.scale * part for t, part in p.items()}
            for n, p in tsv_skill_parts(list(skills.values()), matrices=lambda _n, _t: True).items()
        }
        examples = {n: s.examples for n, s in self._skills.items() if s.examples is not None}
        heads = self._inner.heads
        tensors, self.calibration = learn_part_weights(
            self.model,
            base,
            parts,
            lambda n: _alone(self._skills[n], base, names),
            heads,
            examples,
            loss=loss,
            per=per,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
        )
        with torch.no_grad():
            for dst, value in tensors.items():
                self._tensors[dst].data.copy_(value.to(self._tensors[dst].dtype))
        return self.calibration

    def _uncalibrate(self) -> None:
        """After a calibration, every matrix back to the plain composition of the stitched skills."""
        if self.calibration is None:
            return
        self.calibration = None
        touched = self._touched()
        self._write(self._composed(self._matrices, touched), touched)

    def _touched(self) -> dict[str, Region]:
        """Every matrix a stitched skill touches (a region of it, by base name)."""
        return {src: r for s in self._matrices.values() for src, r in s.regions.items() if s.touches(src)}

    def _base_tensors(self, names: Mapping[str, str]) -> dict[str, Tensor]:
        """The base value (float32) of every model tensor in ``names``' values: the model's with its base entries back."""
        saved = self.base_values()
        out = {}
        for dst in set(names.values()):
            tensor = self._tensors[dst].detach().float().reshape(-1).clone()
            if dst in saved:
                indices, values = saved[dst]
                tensor[indices.to(tensor.device)] = values.to(tensor.device, torch.float32)
            out[dst] = tensor.reshape(self._tensors[dst].shape)
        return out

    def _split(self, skill: Skill) -> tuple[Skill, Skill]:
        """``skill``'s regions in weight matrices (checked here) and the rest (the inner stitcher checks those)."""
        shapes = skill.metadata.shapes
        names = align_names(shapes, self._tensors)
        matrix = {
            src: region
            for src, region in skill.regions.items()
            if src in names and is_weight_matrix(src, torch.empty(shapes[src], device="meta"))
        }
        for src, part in skill.low_rank.items():  # a low-rank part is dense over its matrix: composed here or refused
            tensor = self._tensors.get(names.get(src, ""))
            if tensor is None or src not in shapes or list(tensor.shape) != part.shape or part.shape != list(shapes[src]):
                raise StitchError(
                    f"skill {skill.name!r}: its low-rank part of {src!r} ({part.shape}) matches no weight matrix of the "
                    "model of that shape; is it the right base?"
                )
            if not is_weight_matrix(src, tensor):
                raise StitchError(f"skill {skill.name!r} has a low-rank part of {src!r}, which is not a weight matrix.")
            empty = Region(torch.empty(0, dtype=torch.int64, device="cpu"), torch.empty(0, device="cpu"))
            matrix.setdefault(src, skill.regions.get(src) or empty)
        for src, region in matrix.items():
            tensor = self._tensors[names[src]]
            if list(tensor.shape) != list(shapes[src]):
                continue  # the inner stitcher names the mismatch
            indices = region.indices.reshape(-1)
            ordered = bool((indices[1:] > indices[:-1]).all()) if len(indices) > 1 else True
            inside = len(indices) == 0 or (int(indices[0]) >= 0 and int(indices[-1]) < tensor.numel())
            if not (ordered and inside and region.values.numel() == indices.numel()):
                raise StitchError(
                    f"skill {skill.name!r}: indices of {src!r} fall outside its {tensor.numel()} entries or are not "
                    "strictly ascending; the skill is damaged."
                )
            if not bool(torch.isfinite(region.values).all()):
                raise StitchError(f"skill {skill.name!r} has NaN/Inf values in {src!r}; it cannot be stitched.")
        rest = {src: region for src, region in skill.regions.items() if src not in matrix}
        return replace(skill, regions=matrix), replace(skill, regions=rest, low_rank={})

    def _composed(self, skills: Mapping[str, Skill], touched: Mapping[str, Region]) -> SpectralComposition:
        """``merge`` of ``skills`` in each matrix of ``touched``, at scale 1 (computed before anything is written)."""
        covering = [
            replace(
                s,
                regions={src: s.regions[src] for src in touched if src in s.regions},
                low_rank={src: s.low_rank[src] for src in touched if src in s.low_rank},
            )
            for s in skills.values()
            if any(map(s.touches, touched))
        ]
        if not covering:
            return SpectralComposition({}, frozenset())
        factors = self._factors if self.merge == "tsv_m" else None
        return compose_spectral(covering, self.merge, matrices=lambda _n, _t: True, factors=factors)

    def _write(self, composed: SpectralComposition, touched: Mapping[str, Region]) -> None:
        """``base + scale · unit`` into each matrix of ``touched`` (``base + unit`` where the composition leaves it
        unscaled; the base, where no skill touches it any more); the compositions kept for :meth:`rescale` follow."""
        names = align_names(list(touched), self._tensors)
        with torch.no_grad():
            for src in touched:
                dst = names[src]
                target = self._tensors[dst]
                if dst not in self._base:
                    self._base[dst] = target.detach().clone()
                if src in composed.units:
                    unit, scaled = composed.units[src], src in composed.scaled
                    merged = self._base[dst].float() + ((self.scale if scaled else 1.0) * unit).to(target.device)
                    target.data.copy_(merged.to(target.dtype))
                    if self._units is not None:
                        self._units[src] = (unit, scaled)
                else:
                    target.data.copy_(self._base.pop(dst))
                    if self._units is not None:
                        self._units.pop(src, None)


def _alone(skill: Skill, base: Mapping[str, Tensor], names: Mapping[str, str]) -> dict[str, Tensor]:
    """Every tensor of ``base`` as the base plus ``skill`` alone: its τ added over its entries, the base elsewhere."""
    out = dict(base)
    for src, region in skill.regions.items():
        if len(region):
            dst = names[src]
            flat = base[dst].reshape(-1).clone()
            flat[region.indices.to(flat.device)] += region.values.to(flat.device, torch.float32)
            out[dst] = flat.reshape(base[dst].shape)
    for src, part in skill.low_rank.items():
        out[names[src]] = out[names[src]] + part.dense().to(base[names[src]].device)
    return out

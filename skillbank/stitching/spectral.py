"""Skills composed matrix by matrix (TSV-M, Iso-C, Iso-CTS on what the skills hold), not entry by entry.

The overlap rules combine skills per entry. A spectral composition treats each weight matrix as a whole:
the skills that touch it are densified there (their sparse ``τ``), and a merge of
:data:`~skillbank.vectors.spectral.MATRIX_MERGES` decorrelates their singular directions (TSV-M) or flattens
the spectrum (Iso-C, Iso-CTS). Every other tensor takes the mean of the skills covering each entry, as the
``mean`` rule does. A scale multiplies the merged matrices only; under Iso-C and Iso-CTS a matrix one skill
alone touches is that skill's own τ, unscaled. It is a pure function of the set of skills: recomputed exactly
from them, deterministic, independent of the order they arrived in (they are taken in name order).

>>> import torch
>>> from skillbank.storage.skill import Region, Skill, SkillMetadata
>>> meta = lambda n: SkillMetadata(n, "fp", 0.5, {"layer.weight": [2, 2], "layer.bias": [2]})
>>> a = Skill(meta("a"), {"layer.weight": Region(torch.tensor([0]), torch.tensor([4.0])),
...                       "layer.bias": Region(torch.tensor([0]), torch.tensor([1.0]))})
>>> b = Skill(meta("b"), {"layer.weight": Region(torch.tensor([3]), torch.tensor([2.0])),
...                       "layer.bias": Region(torch.tensor([0, 1]), torch.tensor([3.0, 5.0]))})
>>> delta = spectral_delta([a, b], "tsv_m")
>>> delta["layer.weight"].tolist(), delta["layer.bias"].tolist()  # orthogonal skills add up; biases: covering mean
([[4.0, 0.0], [0.0, 2.0]], [2.0, 5.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from skillbank.errors import StitchError
from skillbank.storage.skill import Skill
from skillbank.vectors.spectral import MATRIX_MERGES, Factors, is_weight_matrix, top_factors, tsv_keep, tsv_parts

__all__ = ["SpectralComposition", "compose_spectral", "spectral_delta", "tsv_skill_parts"]


@dataclass(frozen=True)
class SpectralComposition:
    """Skills composed matrix by matrix, at scale 1: each tensor's offset from the base (float32, on the CPU), and
    the tensors a scale multiplies (the matrices a merge composed; not the covering means, nor a matrix a flattening
    merge takes as its one skill's own τ)."""

    units: dict[str, Tensor]
    scaled: frozenset[str]

    def at(self, scale: float) -> dict[str, Tensor]:
        """The offsets at ``scale``: the scaled tensors times ``scale``, every other tensor as it is."""
        return {name: scale * unit if name in self.scaled else unit for name, unit in self.units.items()}


def compose_spectral(
    skills: Sequence[Skill],
    merge: str = "tsv_m",
    matrices: Callable[[str, Tensor], bool] | None = None,
    factors: MutableMapping[tuple[str, str], Factors] | None = None,
) -> SpectralComposition:
    """``skills`` composed by ``merge`` at scale 1: each weight matrix (2-D, outside the embeddings, unless
    ``matrices`` says otherwise) is ``merge`` of the skills that touch it; elsewhere the mean of the skills covering
    each entry, as the ``mean`` overlap rule stitches it. Under a merge that flattens the spectrum (Iso-C, Iso-CTS) a
    matrix one skill alone touches is that skill's own τ, unscaled: with nothing to balance, flattening one skill's
    spectrum only distorts it (TSV-M gives one skill back as itself anyway). :meth:`SpectralComposition.at` scales.

    ``factors`` (TSV-M): each ``(skill, tensor)``'s top singular triplets, read where they are there and enough,
    written (trimmed to what this composition keeps) where they are not: a later composition that shares skills
    skips their SVDs and gives the same result, bit for bit (a skill's τ, so its SVD, never changes).

    Raises:
        StitchError: an unknown merge, skills of different shapes for one tensor, or two skills of one name.
    """
    combine = MATRIX_MERGES[merge]  # an unknown name is refused before any work
    units, scaled = {}, set()
    for tensor, dense, counts, is_matrix in _dense_tensors(skills, matrices):
        if not is_matrix:
            units[tensor] = torch.stack(list(dense.values())).sum(0) / counts
        elif combine.flattens and len(dense) == 1:
            units[tensor] = next(iter(dense.values()))
        else:
            if merge == "tsv_m" and factors is not None and len(dense) > 1:
                units[tensor] = torch.stack(tsv_parts(list(dense.values()), _known(dense, tensor, factors))).sum(0)
            else:
                units[tensor] = combine(list(dense.values()))
            scaled.add(tensor)
    return SpectralComposition(units, frozenset(scaled))


def spectral_delta(
    skills: Sequence[Skill],
    merge: str = "tsv_m",
    scale: float = 1.0,
    matrices: Callable[[str, Tensor], bool] | None = None,
    factors: MutableMapping[tuple[str, str], Factors] | None = None,
) -> dict[str, Tensor]:
    """The offset from the base that composing ``skills`` by ``merge`` at ``scale`` gives, by (base) tensor name,
    float32 on the CPU: :func:`compose_spectral` (the same arguments) at ``scale``. The scale multiplies the matrices
    a merge composed, never the covering means (biases, LayerNorms, embeddings) nor a lone skill's own τ."""
    return compose_spectral(skills, merge, matrices, factors).at(scale)


def _known(dense: Mapping[str, Tensor], tensor: str, factors: MutableMapping[tuple[str, str], Factors]) -> list[Factors]:
    """Each skill's top TSV-M singular triplets of ``tensor``: from ``factors`` where it holds enough, else computed;
    ``factors`` keeps exactly what this composition keeps (memory: about two copies of the matrix over all skills)."""
    keep = tsv_keep(list(dense.values()))
    out = []
    for name, matrix in dense.items():
        known = factors.get((name, tensor))
        if known is None or known[1].numel() < keep:
            known = top_factors(matrix, keep)
        elif known[1].numel() > keep:
            known = (known[0][:, :keep].clone(), known[1][:keep].clone(), known[2][:keep].clone())
        factors[(name, tensor)] = known
        out.append(known)
    return out


def tsv_skill_parts(
    skills: Sequence[Skill], matrices: Callable[[str, Tensor], bool] | None = None
) -> dict[str, dict[str, Tensor]]:
    """Each skill's part of ``spectral_delta(skills, "tsv_m")`` (``{skill: {tensor: part}}``): in each matrix its
    decorrelated singular directions with its singular values, elsewhere its values over the covering count. The
    parts add up to the composition, so a skill's share can be weighted per tensor (e.g. on a few examples)."""
    parts: dict[str, dict[str, Tensor]] = {s.name: {} for s in skills}
    for tensor, dense, counts, is_matrix in _dense_tensors(skills, matrices):
        split = tsv_parts(list(dense.values())) if is_matrix else [t / counts for t in dense.values()]
        for name, part in zip(dense, split):
            parts[name][tensor] = part
    return parts


def _dense_tensors(
    skills: Sequence[Skill], matrices: Callable[[str, Tensor], bool] | None
) -> Iterator[tuple[str, dict[str, Tensor], Tensor, bool]]:
    """Per tensor some skill covers: ``{skill: its dense τ there}`` (in name order), how many skills cover each
    entry (at least 1), and whether the tensor is a weight matrix; one tensor at a time."""
    names = [s.name for s in skills]
    if len(set(names)) != len(names):
        raise StitchError(f"two skills share a name in {sorted(names)}; compose each skill once.")
    ordered = sorted(skills, key=lambda s: s.name)  # the set decides, not the order of arrival
    is_matrix = matrices or is_weight_matrix
    shapes: dict[str, list[int]] = {}
    for skill in ordered:
        for tensor, shape in skill.metadata.shapes.items():
            if shapes.setdefault(tensor, list(shape)) != list(shape):
                raise StitchError(f"skills disagree on the shape of {tensor!r}: {shapes[tensor]} and {list(shape)}.")
    for tensor, shape in shapes.items():
        covering = [s for s in ordered if s.touches(tensor)]
        if not covering:
            continue
        dense, count = {}, torch.zeros(math.prod(shape), dtype=torch.float32, device="cpu")
        for skill in covering:
            flat = torch.zeros(math.prod(shape), dtype=torch.float32, device="cpu")
            region = skill.regions.get(tensor)
            if region is not None and len(region):
                indices = region.indices.to("cpu", torch.int64)
                flat[indices] = region.values.to("cpu", torch.float32)
                count[indices] += 1
            dense[skill.name] = flat.reshape(shape)
            if tensor in skill.low_rank:  # the sparse region holds what the low-rank part leaves: they add up
                dense[skill.name] += skill.low_rank[tensor].dense().cpu()
        first = next(iter(dense.values()))
        matrix = is_matrix(tensor, first)
        if not matrix and any(tensor in s.low_rank for s in covering):
            raise StitchError(f"a skill has a low-rank part of {tensor!r}, which is not a weight matrix; the skill is damaged.")
        yield tensor, dense, count.clamp_min(1).reshape(shape), matrix

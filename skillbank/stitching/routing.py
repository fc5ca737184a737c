"""Routing: pick the skill for a request that does not name its task.

A skill may carry a handful of *centroids*: the base model's mean-pooled
features of the examples it was localized with, one per class. At serving
time one forward of the **base** gives an input's features; the router sends
it to the skill with the most similar centroid (cosine similarity). The cost
is that one extra forward of the base per batch (with the features of the
base, not of whichever skill is active, so routing never depends on what is
stitched), then one switch per skill the batch needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from skillbank.errors import SkillbankError
from skillbank.storage.skill import MAX_CENTROIDS, Skill

__all__ = ["FEATURES", "SkillRouter", "centroids", "mean_pooled_features", "routing_centroids", "with_routing"]

#: What :func:`mean_pooled_features` computes; recorded in each skill's ``metadata.routing``.
FEATURES = "mean-pooled last hidden state of the base model"
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def mean_pooled_features(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """``[B, D]``: the encoder's last hidden state averaged over the tokens the attention mask keeps.

    ``model`` is a Hugging Face encoder or a task model built on one (its
    ``base_model`` is used, so a classifier's head is never run).
    """
    encoder = getattr(model, "base_model", model)
    inputs = {k: batch[k] for k in _INPUT_KEYS if k in batch}
    if "input_ids" not in inputs:
        raise SkillbankError("routing needs tokenized batches with 'input_ids' (and 'attention_mask').")
    out = encoder(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = inputs.get("attention_mask")
    if mask is None:
        return hidden.float().mean(1)
    weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def centroids(features: Tensor, labels: Tensor | None = None, max_centroids: int = 16) -> Tensor:
    """``[C, D]`` float32: the mean feature of each label (at most ``max_centroids``, the most frequent), or of all.

    >>> centroids(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1])).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """
    if features.dim() != 2 or not len(features):
        raise SkillbankError(f"routing features must be a non-empty [N, D] matrix, got shape {list(features.shape)}.")
    if not 1 <= max_centroids <= MAX_CENTROIDS:
        raise SkillbankError(f"max_centroids must be in 1..{MAX_CENTROIDS}, got {max_centroids}.")
    features = features.detach().float().cpu()
    if labels is None:
        return features.mean(0, keepdim=True)
    labels = labels.detach().cpu().reshape(-1)
    if len(labels) != len(features):
        raise SkillbankError(f"{len(labels)} labels for {len(features)} feature rows.")
    values, counts = labels.unique(return_counts=True)
    kept = values[counts.argsort(descending=True, stable=True)[:max_centroids]].sort().values
    return torch.stack([features[labels == v].mean(0) for v in kept])


@torch.no_grad()
def routing_centroids(model: nn.Module, batches: Iterable[Mapping[str, Any]], max_centroids: int = 16) -> Tensor:
    """Centroids of ``model``'s :func:`mean_pooled_features` over ``batches`` (per ``labels`` when batches have them).

    ``model`` must hold the **base** weights: the router compares inputs with
    these under the base. The model is put in eval mode and left so.
    """
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for batch in batches:
        moved = {k: v.to(device) for k, v in batch.items() if k in _INPUT_KEYS}
        feats.append(mean_pooled_features(model, moved).cpu())
        if "labels" in batch:
            labels.append(torch.as_tensor(batch["labels"], device="cpu").reshape(-1))
    if not feats:
        raise SkillbankError("no batches to compute routing centroids from.")
    features = torch.cat(feats)
    return centroids(features, torch.cat(labels) if len(labels) == len(feats) else None, max_centroids)


def with_routing(skill: Skill, centroids: Tensor, features: str = FEATURES) -> Skill:
    """A copy of ``skill`` carrying ``centroids``, with how they were made in ``metadata.routing``."""
    routing = {"features": features, "centroids": int(centroids.shape[0]), "dim": int(centroids.shape[1])}
    return replace(skill, centroids=centroids.detach().float().cpu(), metadata=replace(skill.metadata, routing=routing))


class SkillRouter:
    """Nearest-centroid routing over skills' stored centroids (cosine similarity, best centroid per skill).

    Args:
        skills: skills (e.g. ``[bank.get(n) for n in bank.names()]``), or a
            mapping of name to ``[C, D]`` centroids.
        width: the base model's feature width (``config.hidden_size``): every
            skill's centroids must be that wide, checked here, so a skill made for
            another base is named now rather than failing at the first request.

    Raises:
        SkillbankError: a skill has no routing data (say how to add it), or
            the skills' features differ in width or base, or from ``width``.
    """

    def __init__(self, skills: Iterable[Skill] | Mapping[str, Tensor], width: int | None = None) -> None:
        named: dict[str, Tensor] = {}
        bases: set[str] = set()
        if isinstance(skills, Mapping):
            named = {n: torch.as_tensor(c, device="cpu").float() for n, c in skills.items()}
        else:
            for skill in skills:
                if skill.centroids is None:
                    raise SkillbankError(
                        f"skill {skill.name!r} has no routing data; localize it with examples "
                        "(skillbank localize --routing-data FILE, or skillbank.stitching.routing.with_routing) to route to it."
                    )
                named[skill.name] = skill.centroids.float()
                bases.add(skill.metadata.base_fingerprint)
        if not named:
            raise SkillbankError("a router needs at least one skill with routing data.")
        if len(bases) > 1:
            raise SkillbankError("the skills were localized on different base models; their routing features do not compare.")
        if width is not None:
            wrong = next((n for n, c in named.items() if c.dim() != 2 or c.shape[-1] != width), None)
            if wrong is not None:
                raise SkillbankError(
                    f"skill {wrong!r}'s routing centroids are {list(named[wrong].shape)}, but the base's features are "
                    f"{width} wide: it was not made on this base. Re-localize it with --routing-data, or leave it out (--skills)."
                )
        dims = {c.shape[-1] for c in named.values()}
        if len(dims) != 1:
            raise SkillbankError(
                f"the skills' routing features differ in width ({sorted(dims)}); they come from different bases."
            )
        self.names = list(named)
        self._owner = torch.cat([torch.full((len(c),), i, device="cpu") for i, c in enumerate(named.values())])
        self._centroids = nn.functional.normalize(torch.cat(list(named.values())), dim=-1)

    def scores(self, features: Tensor) -> Tensor:
        """``[B, S]``: per input, the best cosine similarity to each skill's centroids (columns in :attr:`names` order)."""
        if features.dim() != 2 or features.shape[-1] != self._centroids.shape[-1]:
            raise SkillbankError(
                f"features of shape {list(features.shape)} cannot be routed: the skills' centroids are "
                f"{self._centroids.shape[-1]} wide. Route with the base model the skills were localized on."
            )
        sims = nn.functional.normalize(features.detach().float().cpu(), dim=-1) @ self._centroids.T
        out = torch.full((len(sims), len(self.names)), -2.0, device="cpu")
        return out.scatter_reduce(1, self._owner.expand(len(sims), -1), sims, reduce="amax")

    def route(self, features: Tensor) -> list[str]:
        """The chosen skill's name for each input."""
        return [self.names[i] for i in self.scores(features).argmax(1).tolist()]

"""``localize_finetune``: the one path from a finetune to a skill. ``skillbank localize``, ``SkillHarvester`` and
configs translate their inputs into a :class:`~skillbank.localization.spec.LocalizationSpec` and
:class:`~skillbank.localization.methods.LocalizationInputs` and call it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.localization.auto_sparsity import search_sparsity, stitched_scorer, with_choice
from skillbank.localization.localize import localize_dataless
from skillbank.localization.methods import LocalizationInputs, LocalizationMethod, get_method
from skillbank.localization.spec import LocalizationSpec
from skillbank.storage.skill import Skill
from skillbank.vectors.adapters import Finetune
from skillbank.vectors.weights import WeightsSource

__all__ = ["localize_finetune"]


def localize_finetune(
    base: WeightsSource,
    finetuned: WeightsSource | Finetune,
    spec: LocalizationSpec,
    *,
    name: str,
    task: str = "",
    inputs: LocalizationInputs | None = None,
    metrics: dict[str, float] | None = None,
    source: dict[str, Any] | None = None,
) -> Skill:
    """The skill of ``finetuned`` over ``base`` as ``spec`` says, with the spec in its metadata (``settings["spec"]``).

    A dataless mask of a fixed size between two model files or folders is computed tensor by
    tensor (:func:`~skillbank.localization.streaming.localize_streaming`: memory follows the skill);
    anything else from the task vector in memory. ``sparsity="auto"`` wraps any method: the
    dataless sizes of ``spec.grid`` are scored on ``inputs.validation`` (each skill alone on
    ``inputs.probe()``), and a learned method then steps down from the dataless choice. With
    ``inputs.routing``, the skill carries routing centroids of the base's features of those examples.

    Raises:
        SkillbankError: what a method or the ``auto`` search needs is missing from ``inputs``.
    """
    inputs = inputs or LocalizationInputs(base=base)
    method = get_method(spec.method)
    method.check(inputs)
    if inputs.routing is not None and inputs.encoder is None and inputs.probe is None:
        raise SkillbankError("routing data needs a model holding the base to take its features from (inputs.encoder).")
    fields: dict[str, Any] = dict(
        name=name, task=task or name, metrics=dict(metrics or {}), source=dict(source or {}), value_dtype=spec.value_dtype
    )
    centroids = None
    if inputs.routing is not None:  # the base's features of the task's examples (taken first, on a fresh probe)
        from skillbank.stitching.routing import routing_centroids, with_routing

        encoder = inputs.encoder or inputs.probe
        assert encoder is not None
        centroids = routing_centroids(encoder(), inputs.routing, spec.routing_centroids)
    skill = _localize(base, finetuned, spec, method, inputs, fields)
    if centroids is not None:
        skill = with_routing(skill, centroids)
    settings = {**skill.metadata.settings, "spec": spec.to_dict()}
    return replace(skill, metadata=replace(skill.metadata, settings=settings))


def _localize(
    base: WeightsSource,
    finetuned: WeightsSource | Finetune,
    spec: LocalizationSpec,
    method: LocalizationMethod,
    inputs: LocalizationInputs,
    fields: dict[str, Any],
) -> Skill:
    if method.name == "dataless" and not spec.auto and not spec.low_rank and _streamable(base, finetuned):
        from skillbank.localization.streaming import localize_streaming

        assert isinstance(base, (str, Path)) and isinstance(finetuned, (str, Path))
        return localize_streaming(
            base, finetuned, float(spec.sparsity), exclude=spec.exclude, head_patterns=spec.head_patterns, **fields
        )
    from skillbank.vectors.task_vectors import task_vector

    tv = task_vector(base, finetuned, head_patterns=spec.head_patterns)
    if not spec.auto:
        return method.localize(tv, float(spec.sparsity), spec, inputs, fields)
    if inputs.validation is None or inputs.probe is None:
        raise SkillbankError(
            "sparsity='auto' needs validation data to measure what a mask keeps (CLI: --val-data FILE; "
            "SkillHarvester: the run's validation loader or validation=); or give a number as the sparsity."
        )
    score = stitched_scorer(inputs.probe(), inputs.validation)
    reference = score(localize_dataless(tv, 1.0, name=fields["name"], exclude=spec.exclude))
    dataless = get_method("dataless")
    skill, choice = search_sparsity(
        lambda s: dataless.localize(tv, s, spec, inputs, fields), score, reference, target=spec.target_recovery, grid=spec.grid
    )
    if method is not dataless:  # learned sizes step down from the dataless choice
        skill, choice = search_sparsity(
            lambda s: method.localize(tv, s, spec, inputs, fields),
            score,
            reference,
            target=spec.target_recovery,
            grid=spec.grid,
            start=choice.sparsity,
        )
    return with_choice(skill, choice)


def _streamable(base: object, finetuned: object) -> bool:
    """Whether both are model files or folders of plain weights (a LoRA adapter folder is merged in memory)."""
    from skillbank.vectors.adapters import is_adapter_folder

    return isinstance(base, (str, Path)) and isinstance(finetuned, (str, Path)) and not is_adapter_folder(finetuned)

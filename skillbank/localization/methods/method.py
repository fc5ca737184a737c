"""The localization-method interface and its registry (one method a module, chosen by name, as the overlap rules)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from skillbank.registry import Registry

if TYPE_CHECKING:  # the CLI's --help lists the methods without torch
    from torch import nn

    from skillbank.localization.spec import LocalizationSpec
    from skillbank.storage.skill import Skill
    from skillbank.vectors.task_vectors import TaskVector
    from skillbank.vectors.weights import WeightsSource

__all__ = ["METHODS", "LocalizationInputs", "LocalizationMethod", "get_method", "register_method"]


@dataclass
class LocalizationInputs:
    """What a method may need besides the task vector; each front end fills in what it has.

    Attributes:
        base: the base weights (a learned mask trains against them).
        model: the finetuned model a mask is learned on (copied first: it is reset to the base).
        few_shot: labelled batches a mask is learned on.
        validation: labelled batches the ``auto`` size search scores each skill on.
        probe: makes the model those scores are taken on: the base with the finetune's head.
        time_limit: seconds a learned mask may take (under DDP, what the other ranks can wait).
        routing: batches of the task whose base features become the skill's routing centroids.
        encoder: makes the model those features are taken from (holding the base); default ``probe``.
    """

    base: WeightsSource | None = None
    model: nn.Module | None = None
    few_shot: Iterable[Any] | None = None
    validation: Iterable[Any] | None = None
    probe: Callable[[], nn.Module] | None = None
    time_limit: float | None = None
    routing: Iterable[Any] | None = None
    encoder: Callable[[], nn.Module] | None = None


class LocalizationMethod(ABC):
    """How a skill's mask is found from a task vector at one size (``auto`` sizes wrap any method)."""

    #: The name the CLI, the harvester and configs know the method by.
    name: ClassVar[str]
    #: One line for ``--help``.
    summary: ClassVar[str]

    @abstractmethod
    def localize(
        self, tv: TaskVector, sparsity: float, spec: LocalizationSpec, inputs: LocalizationInputs, fields: dict[str, Any]
    ) -> Skill:
        """The skill of ``tv`` at ``sparsity``; ``fields`` are the skill's name, task, metrics, source and value dtype."""

    def check(self, inputs: LocalizationInputs) -> None:
        """Raise :class:`SkillbankError` saying what is missing from ``inputs`` (before any work)."""


#: Every known method, by name.
METHODS: Registry[LocalizationMethod] = Registry("localization method")


def register_method(method: LocalizationMethod) -> LocalizationMethod:
    """Make ``method`` known by its name; a taken name is an error."""
    return METHODS.add(method.name, method)


def get_method(name: str) -> LocalizationMethod:
    """The method called ``name``; an unknown name is an error listing the known ones."""
    return METHODS[name]

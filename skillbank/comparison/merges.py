"""The global merges skills are compared with, behind one interface and a registry (as the overlap rules are).

Each merge is linear in its scale: ``merge(taus, s) = s · merge(taus, 1)``, so a benchmark merges once and
chooses the scale on validation data from the method's grid. OPCM (adaptive scaling, its state carried from
arrival to arrival) is not a scaled merge and stays :func:`~skillbank.comparison.baselines.opcm_steps`.

>>> sorted(MERGES)[:3]
['average', 'consensus', 'iso_c']
>>> get_merge("tsv_m").label
'TSV-M'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from skillbank.comparison.baselines import TaskVectors, average, consensus, magmax, task_arithmetic, ties
from skillbank.comparison.spectral import iso_c, iso_cts, tsv_m
from skillbank.registry import Registry

__all__ = ["MERGES", "Merge", "get_merge", "register_merge"]


@dataclass(frozen=True)
class Merge:
    """One global merge.

    Attributes:
        name: the registry key (``"tsv_m"``).
        label: the name in tables and ``results.json`` (``"TSV-M"``).
        summary: one line: what it does, and where it comes from.
        unit: the merged delta of the task vectors at scale 1 (settings other than the scale fixed).
        scales: the scales a benchmark tries on validation data (a sweep widens it when the best is at an end).
    """

    name: str
    label: str
    summary: str
    unit: Callable[[TaskVectors], dict[str, Tensor]]
    scales: tuple[float, ...]

    def __call__(self, taus: TaskVectors, scale: float = 1.0) -> dict[str, Tensor]:
        """The merged delta at ``scale``."""
        return {n: scale * t for n, t in self.unit(taus).items()}


#: Every known merge, by name.
MERGES: Registry[Merge] = Registry("merge")


def register_merge(merge: Merge) -> Merge:
    """Make ``merge`` known by its name; a taken name is an error."""
    return MERGES.add(merge.name, merge)


def get_merge(name: str) -> Merge:
    """The merge called ``name``; an unknown name is an error listing the known ones."""
    return MERGES[name]


_WIDE = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # the spectral merges' scales reach past 1 (TSV-M 1.5, Iso-C 2.5 at 8 tasks)

for _merge in (
    Merge("average", "simple averaging", "the mean of the task vectors (model soup)", average, (1.0,)),
    Merge(
        "task_arithmetic",
        "task arithmetic",
        "the sum of the task vectors (Ilharco et al., 2023)",
        lambda taus: task_arithmetic(taus, 1.0),
        (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    ),
    Merge(
        "ties",
        "TIES (top-20%)",
        "each task vector trimmed to its top 20%, signs elected, agreeing entries averaged (Yadav et al., 2023)",
        lambda taus: ties(taus, 0.2, 1.0),
        (0.3, 0.5, 0.7, 1.0, 1.5),
    ),
    Merge(
        "consensus",
        "consensus (TALL, k=2)",
        "the sum kept where at least two tasks' TALL masks agree (Wang et al., 2024)",
        lambda taus: consensus(taus, 2, 0.4, 1.0),
        (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    ),
    Merge("magmax", "MagMax", "per entry, the value of largest magnitude (Marczak et al., 2024)", magmax, (0.5, 0.7, 1.0)),
    Merge("tsv_m", "TSV-M", "per matrix, each task's leading singular directions, decorrelated (CVPR 2025)", tsv_m, _WIDE),
    Merge("iso_c", "Iso-C", "per matrix, the sum with its spectrum flattened (ICML 2025)", iso_c, _WIDE),
    Merge(
        "iso_cts",
        "Iso-CTS",
        "per matrix, the sum's and each task's own directions, decorrelated, spectrum flattened (ICML 2025)",
        iso_cts,
        _WIDE,
    ),
):
    register_merge(_merge)

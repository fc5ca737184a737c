"""The continual picture: how a merge holds up as tasks arrive one at a time (pure functions, no plotting).

After arrival ``t`` (tasks ``order[:t+1]`` seen), each method's merged model is
evaluated on every task seen so far. From those accuracies:

* average normalized accuracy ``A_t = mean_{i ≤ t} a_{t,i} / f_i`` (``f_i`` the finetune's accuracy);
* backward transfer ``BWT_t = mean_{i < t} (a_{t,i} − a_{i,i}) / f_i``: how much the earlier
  tasks lost (negative) or gained since they arrived; 0 at the first arrival.

>>> m = arrival_metrics([{"a": 0.9}, {"a": 0.8, "b": 0.5}], ["a", "b"], {"a": 1.0, "b": 0.5})
>>> [round(x, 3) for x in m["average"]], [round(x, 3) for x in m["bwt"]]
([0.9, 0.9], [0.0, -0.1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from skillbank.errors import SkillbankError

__all__ = ["arrival_metrics"]


def arrival_metrics(
    accuracies: Sequence[Mapping[str, float]], order: Sequence[str], finetuned: Mapping[str, float]
) -> dict[str, list[float]]:
    """``{"average": [A_t …], "bwt": [BWT_t …]}``, one value per arrival.

    Args:
        accuracies: ``accuracies[t][task]`` after arrival ``t``, for every task in ``order[:t+1]``.
        order: the tasks in the order they arrived.
        finetuned: each task's finetuned accuracy (the normalizer).

    Raises:
        SkillbankError: an accuracy or a normalizer is missing, or a normalizer is not positive.
    """
    if len(accuracies) > len(order):
        raise SkillbankError(f"{len(accuracies)} arrivals of accuracies but only {len(order)} tasks in the order.")
    for task in order[: len(accuracies)]:
        value = finetuned.get(task)
        if not isinstance(value, (int, float)) or not value > 0:
            raise SkillbankError(f"task {task!r} needs a positive finetuned accuracy to normalize by, got {value!r}.")
    average, bwt = [], []
    for t, accs in enumerate(accuracies):
        seen = order[: t + 1]
        missing = [k for k in seen if k not in accs]
        if missing:
            raise SkillbankError(f"arrival {t + 1} has no accuracy for {missing}; evaluate every task seen so far.")
        average.append(sum(accs[k] / finetuned[k] for k in seen) / len(seen))
        earlier = [(accs[k] - accuracies[i][k]) / finetuned[k] for i, k in enumerate(order[:t])]
        bwt.append(sum(earlier) / len(earlier) if earlier else 0.0)
    return {"average": average, "bwt": bwt}

"""``Examples``: the few labelled inputs a skill may keep, so skills can be weighed against each other later.

A skill that keeps a calibration set lets a composition of several skills be tuned on every skill's own
examples (per-skill and per-layer weights: :mod:`skillbank.stitching.calibration`) long after the data
that made it is gone. It is opt-in and bounded: a few examples a class, tokenized (integer ``[N, L]``
tensors such as ``input_ids``, ``attention_mask``, ``token_type_ids``) with their labels; stored in the
skill file under ``examples/``, checked like everything else read from a file, dropped with
``skillbank drop-examples``.

>>> import torch
>>> examples = Examples({"input_ids": torch.tensor([[5, 6], [7, 0]])}, torch.tensor([1, 0]))
>>> len(examples), examples.summary()
(2, '2 examples, 2 classes, 2 tokens each')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from skillbank.errors import SkillFileError

__all__ = ["MAX_EXAMPLE_TOKENS", "MAX_EXAMPLES", "Examples"]

#: The most examples one skill may keep, and the most tokens each may have (reads stay bounded).
MAX_EXAMPLES, MAX_EXAMPLE_TOKENS = 4096, 2048
_MAX_INPUTS = 8
_INPUT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PREFIX = "examples/"


@dataclass
class Examples:
    """A skill's calibration set: ``inputs`` (``{name: [N, L] integer tensor}``, as a tokenizer gives a batch)
    and ``labels`` (``[N]`` class indices, or ``None`` where only the inputs are kept). Checked when made."""

    inputs: dict[str, Tensor]
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        problem = _problem(self.inputs, self.labels)
        if problem:
            raise SkillFileError(f"a skill's examples are malformed: {problem}.")
        self.inputs = {k: v.to("cpu", torch.int64) for k, v in self.inputs.items()}
        self.labels = None if self.labels is None else self.labels.to("cpu", torch.int64)

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def length(self) -> int:
        """Tokens per example (the padded width)."""
        return next(iter(self.inputs.values())).shape[1]

    def summary(self) -> str:
        """One line for ``skillbank show``: how many, how many classes, how long."""
        classes = "unlabelled" if self.labels is None else f"{len(torch.unique(self.labels))} classes"
        return f"{len(self)} examples, {classes}, {self.length} tokens each"

    def batches(self, batch_size: int = 32) -> list[dict[str, Tensor]]:
        """The examples as model batches (``labels`` included where kept), in stored order."""
        out = []
        for start in range(0, len(self), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in self.inputs.items()}
            if self.labels is not None:
                batch["labels"] = self.labels[start : start + batch_size]
            out.append(batch)
        return out

    def to_tensors(self) -> dict[str, Tensor]:
        """The skill file's ``examples/`` tensors (token ids as int32 where they fit, masks as uint8)."""
        out = {}
        for name, tensor in self.inputs.items():
            small = tensor.numel() == 0 or (int(tensor.min()) >= 0 and int(tensor.max()) < 2**31)
            dtype = torch.uint8 if bool(((tensor == 0) | (tensor == 1)).all()) else (torch.int32 if small else torch.int64)
            out[f"{_PREFIX}inputs/{name}"] = tensor.to(dtype).contiguous()
        if self.labels is not None:
            out[f"{_PREFIX}labels"] = self.labels.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], origin: str) -> Examples | None:
        """Read what :meth:`to_tensors` wrote (``None`` when there is nothing); :class:`SkillFileError` naming
        ``origin`` for anything else: unknown keys, float or oversized tensors, mismatched lengths."""
        if not tensors:
            return None
        inputs, labels = {}, None
        for key, tensor in tensors.items():
            rest = key[len(_PREFIX) :]
            if rest == "labels":
                labels = tensor
            elif rest.startswith("inputs/"):
                inputs[rest[len("inputs/") :]] = tensor
            else:
                raise SkillFileError(f"{origin} holds an unexpected tensor {key!r}.")
        try:
            return cls(inputs, labels)
        except SkillFileError as exc:
            raise SkillFileError(f"{origin}: {exc} The file is crafted or damaged.") from None

    @staticmethod
    def keys(tensors: Iterable[str]) -> list[str]:
        """Which of a skill file's tensor names are its examples'."""
        return [k for k in tensors if k.startswith(_PREFIX)]


def _problem(inputs: Mapping[str, Tensor], labels: Tensor | None) -> str:
    """What is wrong with a calibration set's tensors ("" if nothing): names, dtypes, shapes and bounds."""
    if not inputs or len(inputs) > _MAX_INPUTS:
        return f"it must have 1 to {_MAX_INPUTS} input tensors, has {len(inputs)}"
    shapes = set()
    for name, tensor in inputs.items():
        if not _INPUT_NAME.fullmatch(name):
            return f"input name {name[:80]!r} is not a plain lower-case identifier"
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool or tensor.dim() != 2:
            return f"input {name!r} must be a 2-D integer tensor, is {tensor.dtype} {list(tensor.shape)}"
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= 2**31):
            return f"input {name!r} holds ids outside [0, 2**31)"
        shapes.add(tuple(tensor.shape))
    if len(shapes) != 1:
        return f"the inputs' shapes differ: {sorted(shapes)}"
    (count, width) = shapes.pop()
    if not 1 <= count <= MAX_EXAMPLES or not 1 <= width <= MAX_EXAMPLE_TOKENS:
        return f"{count} examples of {width} tokens; at most {MAX_EXAMPLES} of {MAX_EXAMPLE_TOKENS} are kept"
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or list(labels.shape) != [count]:
            return f"labels must be {count} integers, are {labels.dtype} {list(labels.shape)}"
        if int(labels.min()) < 0 or int(labels.max()) >= 2**31:
            return "labels must be class indices (0 or more)"
    return ""

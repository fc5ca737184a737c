"""Where work over weights from several places runs, and where its results live.

One rule for every entry point that takes weights from several sources (folders,
state dicts, modules on any device):

* the work runs on the device of the weights it is *about*: the finetuned
  model's for a task vector (a folder is read onto the CPU), the live model's
  for stitching, the first task vector's for a merge, the learner's for a mask;
  ``task_vector(..., device=...)`` names another;
* every other input is brought there one tensor at a time, as it is used, so no
  whole model is ever copied to the GPU (or back) behind the user's back;
* what is stored (skills, banks, exported folders) always lives on the CPU;
* every tensor the package makes names its device, so torch's default device
  (``with torch.device("cuda"):``, ``torch.set_default_device``) changes nothing:
  not where work runs, not what it gives (``tests/test_default_device.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["OnDevice", "device_of"]


def device_of(tensors: Iterable[Tensor], default: torch.device | str = "cpu") -> torch.device:
    """The device of the first tensor of ``tensors`` (``default`` when there is none)."""
    for tensor in tensors:
        return tensor.device
    return torch.device(default)


class OnDevice(Mapping[str, Tensor]):
    """``state`` seen on ``device``: each tensor is moved when it is read, one at a time (none when already there)."""

    def __init__(self, state: Mapping[str, Tensor], device: torch.device) -> None:
        self._state, self.device = state, device

    def __getitem__(self, name: str) -> Tensor:
        return self._state[name].to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

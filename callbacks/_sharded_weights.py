"""A sharded model's weights written one tensor at a time: how ``SkillHarvester`` saves an FSDP2 finetune.

Every rank gathers each tensor in turn and rank 0 writes it into safetensors files of
about :data:`SHARD_BYTES`, so no rank ever holds more than one whole tensor (and rank 0
one file's worth) beyond its own shards; the folder is what
:mod:`skillbank.localization.streaming` reads.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from skillbank.errors import SkillbankError
from skillbank.sharding import reshard
from skillbank.storage.ranks import raise_everywhere

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

__all__ = ["SHARD_BYTES", "save_sharded_weights"]

#: Bytes of weights per safetensors file :func:`save_sharded_weights` writes (Hugging Face's own default is 5 GB).
SHARD_BYTES = 2 << 30


def save_sharded_weights(
    model: nn.Module,
    folder: Path,
    strategy: Strategy,
    extra_files: Mapping[str, Mapping[str, Tensor]] | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Write a sharded ``model``'s weights into ``folder`` (rank 0), gathered one tensor at a time: every rank calls it.

    Files: ``model-00001.safetensors``… with ``model.safetensors.index.json`` (one
    ``model.safetensors`` when one file holds them), the Hugging Face config when the model
    has one, and ``extra_files`` (file name -> tensors, e.g. the base) as given; a file holds
    about ``shard_bytes`` (default :data:`SHARD_BYTES`). Tied
    parameters are written once, under their first name. The folder is staged and renamed,
    so it is complete or absent; a failure on rank 0 is raised on every rank, after every
    rank has taken part in every gather (none is left waiting).
    """
    from torch.distributed.tensor import DTensor

    reshard(model)
    writer, error = None, None
    if strategy.is_global_zero:
        try:
            writer = _ShardWriter(folder, SHARD_BYTES if shard_bytes is None else shard_bytes)
        except Exception as exc:  # noqa: BLE001 - raised everywhere once every gather is done
            error = exc
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: every rank, in order
            if writer is not None and error is None:
                try:
                    writer.add(name, whole.detach())
                except Exception as exc:  # noqa: BLE001
                    error = exc
            del whole
    if writer is not None and error is None:
        try:
            writer.finish(getattr(model, "config", None), extra_files or {})
        except Exception as exc:  # noqa: BLE001
            error = exc
    if writer is not None and error is not None:
        writer.discard()
    raise_everywhere(strategy, error, "saving the sharded weights")
    return folder


class _ShardWriter:
    """Rank 0's side of :func:`save_sharded_weights`: tensors into files of about ``shard_bytes`` each, in order."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        if folder.exists():
            raise SkillbankError(f"{folder} exists: pick a new folder for the weights.")
        self.folder, self.shard_bytes = folder, shard_bytes
        self.staged = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex}")
        self.staged.mkdir(parents=True)
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = self.total = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        self.pending[name] = tensor.to("cpu", copy=True).contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.staged / file), metadata={"format": "pt"})
        self.files.append(file)
        self.weight_map.update(dict.fromkeys(self.pending, file))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: Any, extra_files: Mapping[str, Mapping[str, Tensor]]) -> None:
        """The last file, the index (or the one file renamed ``model.safetensors``), the config, the extra files; then
        the staged folder takes its name."""
        from safetensors.torch import save_file

        self._flush()
        if len(self.files) == 1:
            (self.staged / self.files[0]).rename(self.staged / "model.safetensors")
        else:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.staged / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if callable(getattr(config, "save_pretrained", None)):
            config.save_pretrained(self.staged)
        for file, tensors in extra_files.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.staged / file))
        self.staged.rename(self.folder)

    def discard(self) -> None:
        shutil.rmtree(self.staged, ignore_errors=True)

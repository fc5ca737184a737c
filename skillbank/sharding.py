"""FSDP2 under Lightning's ``ModelParallelStrategy``: the one way skillbank shards a model.

A model is sharded block by block (``fully_shard`` of each repeated block, then of the
whole), over the strategy's data-parallel ranks: skillbank shards data-parallel only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from skillbank.errors import SkillbankError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["data_parallel_mesh", "is_sharded", "repeated_blocks", "reshard", "shard_model"]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of ``ModelParallelStrategy``'s mesh, which must be all of it (no tensor parallelism)."""
    dims = mesh.mesh_dim_names or ()
    if "tensor_parallel" in dims and mesh["tensor_parallel"].size() > 1:
        raise SkillbankError(
            "skillbank shards over data-parallel ranks only: use "
            "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)."
        )
    return mesh["data_parallel"] if "data_parallel" in dims else mesh


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (the largest ``ModuleList``, e.g. a transformer's layers): one FSDP unit each."""
    lists: list[nn.Module] = [m for m in model.modules() if type(m) is nn.ModuleList and len(m) > 1]
    if not lists:
        return []
    return list(max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters())).children())


def shard_model(model: nn.Module, mesh: DeviceMesh) -> list[nn.Module]:
    """``fully_shard`` each repeated block of ``model``, then ``model`` (the rest); returns the FSDP units, root last.

    In a block's forward FSDP gathers that block alone, so the transient memory is one
    block's weights; everything else stays ``1/world`` per rank.
    """
    from torch.distributed.fsdp import fully_shard

    data_mesh = data_parallel_mesh(mesh)
    units = [*repeated_blocks(model), model]
    for unit in units:
        fully_shard(unit, mesh=data_mesh)
    return units


def reshard(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` back to its shards: FSDP keeps the root gathered after a forward without a backward,
    so a reader of the local shards calls this first."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters is a DTensor (FSDP2 or another torch.distributed sharding)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())

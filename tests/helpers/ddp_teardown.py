"""Orderly end of a DDP child script: every rank meets, then the process group is destroyed before exit.

Leaving the group to be torn down by interpreter exit races the gloo threads against
static destructors ("terminate called without an active exception"), which turned a
passing run into a failed child now and then.
"""

from __future__ import annotations

import torch.distributed as dist


def teardown() -> None:
    """Barrier and destroy the default process group, if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

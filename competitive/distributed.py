"""Distributed glue: one global teacher across data-parallel processes.

Under ``DistributedDataParallel`` each process sees its own shard of the batch, so local
cross-entropies differ. With ``granularity="batch"`` the group averages the members' CE over all
ranks (one all-reduce of N numbers per step) before choosing, so every rank picks the same teacher
and the members' parameters stay identical across ranks.
"""

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor


def global_mean(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor] | None:
    """A function averaging a tensor over ``group``'s ranks, or None outside a multi-process run."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    # functional collectives trace into a torch.compile graph and do not block the host
    from torch.distributed import _functional_collectives as funcol

    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)

    def mean(x: Tensor) -> Tensor:
        # a sum, then a division: gloo has no "avg" reduction
        return funcol.all_reduce(x, "sum", group) / world

    return mean

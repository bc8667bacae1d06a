"""Distributed glue: one global teacher across data-parallel processes, and the group's own
learnable parts kept identical on every rank.

Under ``DistributedDataParallel`` each process sees its own shard of the batch, so local
cross-entropies differ. With ``granularity="batch"`` the group averages the members' CE over all
ranks (one all-reduce of N numbers per step) before choosing, so every rank picks the same teacher
and the members' parameters stay identical across ranks.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def global_mean(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor] | None:
    """A function averaging a tensor over ``group``'s ranks, or None outside a multi-process run."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    # functional collectives trace into a torch.compile graph and do not block the host
    from torch.distributed import _functional_collectives as funcol

    ranks = group if group is not None else dist.group.WORLD
    if ranks is None:
        raise RuntimeError("global_mean: the process group is initialized but has no WORLD group.")
    world = dist.get_world_size(ranks)

    def mean(x: Tensor) -> Tensor:
        # a sum, then a division: gloo has no "avg" reduction
        total: Tensor = funcol.all_reduce(x, "sum", ranks)
        return total / world

    return mean


def default_seed(group: dist.ProcessGroup | None = None) -> int:
    """The seed of a group built with ``seed=None``: ``torch.initial_seed()``, rank 0's on every rank.

    Reading the initial seed draws nothing, so torch's global stream is untouched, and a script
    seeded with ``torch.manual_seed`` repeats bit for bit (an unseeded one differs from run to run, as
    torch's own seed does). Under an initialized process group, rank 0's seed is broadcast once, so
    every rank perturbs the same member with the same operation at every step.
    """
    seed = torch.initial_seed()
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return seed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    shared = torch.tensor(seed % 2**63, dtype=torch.int64, device=device)  # int64 holds any seed mod 2^63
    dist.broadcast(shared, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(shared.item())


def share_parameters(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Keep ``module``'s parameters (the group's own adapters and heads) identical on every rank.

    The members are the user's ``DistributedDataParallel`` modules; the parts a group creates are
    not, so the group does what DDP would: it broadcasts their initial values from the group's
    first rank, and averages each gradient over the ranks as soon as it is accumulated (so
    ``group.loss()`` with the caller's own backward, gradient accumulation included, stays in step).
    Outside a multi-process run this does nothing.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    world = dist.get_world_size(group)
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for p in module.parameters():
        if getattr(p, "_competitive_shared", False):
            continue
        with torch.no_grad():
            dist.broadcast(p.data, src=source, group=group)

        def average(param: Tensor) -> None:
            if param.grad is not None:  # the hook runs after accumulation: there is a gradient
                dist.all_reduce(param.grad, group=group)
                param.grad.div_(world)

        p.register_post_accumulate_grad_hook(average)  # type: ignore[no-untyped-call]  # unannotated in torch
        p._competitive_shared = True  # type: ignore[attr-defined]  # our marker: hooks are added once

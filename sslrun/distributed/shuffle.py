"""Shuffle-BN (MoCo, He et al. 2020, sec. 3.3): run a module on a batch shuffled across processes."""

from typing import Callable

import torch
import torch.distributed as dist

from sslrun.distributed.gather import all_gather_with_grad, is_distributed, rank, world_size


@torch.no_grad()
def shuffled_across_processes(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """module(x) for this process's rows, computed with the global batch randomly re-dealt over
    processes, so each process's BN statistics come from other samples than the ones it returns.

    Without gradient (MoCo's key encoder). On one process it is just module(x)."""
    if not is_distributed():
        return module(x)
    everything = all_gather_with_grad(x)
    order = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(order, src=0)
    mine = order.view(world_size(), -1)[rank()]
    outputs = all_gather_with_grad(module(everything[mine]))
    restored = torch.empty_like(outputs)
    restored[order] = outputs
    return restored.view(world_size(), x.shape[0], *outputs.shape[1:])[rank()]

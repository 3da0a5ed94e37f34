"""Run a function in N real processes joined by a gloo process group (CPU)."""

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_in_processes(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` spawned processes; raises if any of them fails.

    fn must be importable (defined at module level); results travel through files."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)

"""Distributed building blocks kept apart from models and losses: gathers and global BN."""

from sslrun.distributed.gather import (all_gather_with_grad, all_reduce_sum, all_reduce_sum_with_grad,
                                      exchange_with_neighbours, gather_rows, rank, world_size)
from sslrun.distributed.global_bn import GlobalBatchNorm, convert_to_global_bn
from sslrun.distributed.shuffle import shuffled_across_processes

__all__ = [
    "all_gather_with_grad", "all_reduce_sum", "all_reduce_sum_with_grad", "exchange_with_neighbours", "gather_rows",
    "rank", "world_size", "GlobalBatchNorm", "convert_to_global_bn", "shuffled_across_processes",
]

"""The order of training images: one global order per epoch, cut into global batches, each split
between the processes.

Global batch k of epoch e is `order_e[k*G:(k+1)*G]` (G = the global batch size) whatever the
number of processes: process r of W takes the r-th of W equal contiguous slices of it. So 1
process x 2B and 2 processes x B train on the same batches (in the same order once gathered), a
run can resume on another number of processes, and mid-epoch it resumes at the next unseen batch.
The sampler yields (epoch, index) keys, so each image's augmentation can be seeded by both.
"""

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler):
    def __init__(self, size: int, per_process_batch: int, world: int, rank: int, seed: int):
        if size < per_process_batch * world:
            raise ValueError(f"{size} images cannot fill one global batch of {per_process_batch * world}")
        self.size, self.batch, self.world, self.rank = size, per_process_batch, world, rank
        self.seed = seed
        self.epoch = 0
        self.resume: Optional[Tuple[int, int]] = None  # (epoch, global batches already trained on)

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the last partial one is dropped)."""
        return self.size // (self.batch * self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make epoch `epoch` start after its first `batches` global batches."""
        self.resume = (epoch, batches)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch

    def order(self, epoch: int) -> torch.Tensor:
        """The global order of data set indices in `epoch`: a permutation drawn from (seed, epoch)."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, order = self.epoch, self.order(self.epoch)
        first = self.resume[1] if self.resume is not None and self.resume[0] == epoch else 0
        global_batch = self.batch * self.world
        for k in range(first, self.batches_per_epoch):
            start = k * global_batch + self.rank * self.batch
            for index in order[start:start + self.batch].tolist():
                yield epoch, index

"""The DataModule: datasets -> per-image crops (workers) -> collate -> batched photometric views.

A training batch is a dict (see shared/design.md): `views`, a list of float tensors [B, C, H, W],
one per crop, global crops first; `label` [B] (-1 where unknown); `index` [B], the sample's
position in the training split. Held-out evaluation batches are `(uint8 images, labels)`.

Every random choice about an image (its crops, its photometric parameters) is drawn in the worker
from a generator seeded by (run seed, epoch, index), and the order of images comes from
`GlobalBatchSampler`: a run sees the same batches and the same views on any number of processes
or workers, and resumes mid-epoch at the next unseen batch.
"""

import logging
import os
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sslrun.data.augment import PhotometricAugment
from sslrun.data.datasets import Splits, build_splits
from sslrun.data.sampler import GlobalBatchSampler
from sslrun.data.transforms import CenterView, MultiCrop, sample_generator

log = logging.getLogger(__name__)


class TrainingViews(Dataset):
    """Item (epoch, index): the image's crops, their photometric parameters, label and index."""

    def __init__(self, base: Dataset, crops: MultiCrop, augment: PhotometricAugment, seed: int):
        self.base, self.crops, self.augment, self.seed = base, crops, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.base[index]
        generator = sample_generator(self.seed, epoch, index)
        return self.crops(image, generator), self.augment.draw(generator), label, index


class EvalViews(Dataset):
    """Item index: the image in the evaluation view, and its label."""

    def __init__(self, base: Dataset, view: CenterView):
        self.base, self.view = base, view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.view(image), label


def collate_views(samples):
    crops, params, labels, indices = zip(*samples)
    return {
        "views": [torch.stack(view) for view in zip(*crops)],
        "photometric": [torch.stack(view) for view in zip(*params)],
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
    }


def collate_eval(samples):
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def default_num_workers(processes_per_node: int) -> int:
    """Leave one core per process for the training step; cap at 8 workers per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // processes_per_node - 1))


def fixed_subset(dataset: Dataset, size: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of `size` items (all of them when size is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    order = np.random.default_rng(seed).permutation(len(dataset))[:size]
    return Subset(dataset, np.sort(order).tolist())


class SSLDataModule(L.LightningDataModule):
    def __init__(self, data_cfg, views_cfg, eval_cfg, processes: int, processes_per_node: int, seed: int):
        super().__init__()
        self.cfg, self.views_cfg, self.eval_cfg = data_cfg, views_cfg, eval_cfg
        self.processes, self.seed = processes, seed
        self.per_process_batch = data_cfg.batch_size // processes
        self.resume = None  # (epoch, global batches done) from a checkpoint
        self.num_workers = (
            data_cfg.num_workers if data_cfg.num_workers is not None else default_num_workers(processes_per_node)
        )
        self.augment = PhotometricAugment(views_cfg, data_cfg.mean, data_cfg.std)
        self.splits: Optional[Splits] = None

    def load(self) -> Splits:
        """Open the data set (cheap checks first: called before training starts)."""
        if self.splits is None:
            self.splits = build_splits(self.cfg)
            log.info(
                "data %s: %d training images, %s held-out, %d classes",
                self.cfg.name, len(self.splits.train),
                len(self.splits.heldout) if self.splits.heldout is not None else "no",
                self.splits.num_classes,
            )
        return self.splits

    def setup(self, stage: Optional[str] = None) -> None:
        self.load()

    @property
    def train_size(self) -> int:
        return len(self.load().train)

    def _loader(self, dataset, batch_size, collate, sampler=None) -> DataLoader:
        pin_memory = self.cfg.pin_memory
        if pin_memory is None:
            pin_memory = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=sampler is not None,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.cfg.persistent_workers and self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        train = self.load().train
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = GlobalBatchSampler(len(train), self.per_process_batch, self.processes, rank, self.seed)
        if self.resume is not None:
            sampler.resume_at(*self.resume)
        dataset = TrainingViews(train, MultiCrop(self.views_cfg), self.augment, self.seed)
        return self._loader(dataset, self.per_process_batch, collate_views, sampler)

    def state_dict(self) -> dict:
        """Where training is in the data: the epoch and the global batches of it already trained
        on (counted by the training loop, not by the loader, which reads ahead)."""
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        epoch, batches = divmod(trained, self.train_size // self.cfg.batch_size)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.resume = (state["epoch"], state["batches"])

    def eval_loaders(self, rank: int, world: int):
        """(bank, queries) loaders over this rank's shard of the kNN bank and held-out queries.

        The bank is a fixed subset of the training split, the queries the held-out split, both
        with the evaluation view. Each rank reads every `world`-th item; callers gather.
        """
        splits = self.load()
        if splits.heldout is None:
            return None
        view = CenterView(self.cfg.image_size, self.cfg.eval_crop_fraction)
        bank = fixed_subset(splits.train, self.eval_cfg.knn.bank_size, self.seed)
        queries = fixed_subset(splits.heldout, self.eval_cfg.knn.query_size, self.seed)
        return tuple(
            self._loader(
                Subset(EvalViews(part, view), list(range(rank, len(part), world))),
                self.cfg.eval_batch_size, collate_eval,
            )
            for part in (bank, queries)
        )

    def sample_images(self, count: int) -> torch.Tensor:
        """The first `count` held-out images (training images when there is no held-out split)
        with the evaluation view: uint8 [count, C, H, W], the same ones every time."""
        splits = self.load()
        source = splits.heldout if splits.heldout is not None else splits.train
        view = CenterView(self.cfg.image_size, self.cfg.eval_crop_fraction)
        return torch.stack([view(source[i][0]) for i in range(min(count, len(source)))])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "views" in batch:
            batch["views"] = self.augment(batch["views"], batch.pop("photometric"))
        return batch

    def skipped_images(self) -> int:
        return sum(getattr(split, "skipped", 0) for split in (self.load().train, self.load().heldout))

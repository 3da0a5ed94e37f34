"""The DataModule: datasets -> per-image crops (workers) -> collate -> batched photometric views.
(With data.decode=device the workers only read the files; decoding and crops join the batched
step on the device: see decode.py.)

A training batch is a dict (see shared/design.md): `views`, a list of float tensors [B, C, H, W],
one per crop, global crops first; `label` [B] (-1 where unknown); `index` [B], the sample's
position in the training split; for image-text methods `text` [B, L], the caption's token ids
(one of the image's captions, drawn per epoch); for methods that mask patches per image (I-JEPA),
`masks`, the images' masks packed as `masking.pack_masks` packs them. Held-out evaluation batches are
`(uint8 images, labels)`, and `(uint8 images, labels, caption tokens)` for image-text evaluation.

Every random choice about an image (its masks, crops, photometric parameters) is drawn in the worker
from a generator seeded by (run seed, epoch, index), and the order of images comes from
`GlobalBatchSampler`: a run sees the same batches and the same views on any number of processes
or workers, and resumes mid-epoch at the next unseen batch.
"""

import io
import logging
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sslrun.data.augment import PhotometricAugment
from sslrun.data.decode import DeviceCrops
from sslrun.data.datasets import (IMAGE_MODES, CaptionFile, ClassCaptions, DataError, Shards, Splits, build_splits,
                                   open_image)
from sslrun.data.masking import ContextAndTargets, pack_masks
from sslrun.data.shards import ShardStream
from sslrun.data.sampler import GlobalBatchSampler
from sslrun.data.tokenizer import Tokenizer
from sslrun.data.transforms import CenterView, MultiCrop, Upscaled, sample_generator

log = logging.getLogger(__name__)

SampleMasks = Callable[[torch.Generator], ContextAndTargets]  # one image's masks from its sample generator


@dataclass
class Captions:
    """What image-text methods need from the data: a tokenizer, and the prompt templates that
    caption images which have only a class label."""

    tokenizer: Tokenizer
    prompts: List[str]

    def tokens(self, captions: List[str], generator: torch.Generator) -> torch.Tensor:
        """The token ids [L] of one of `captions`, drawn with `generator`."""
        choice = int(torch.randint(len(captions), (1,), generator=generator)) if len(captions) > 1 else 0
        return self.tokenizer(captions[choice])[0]


class TrainingViews(Dataset):
    """Item (epoch, index): the image's crops, their photometric parameters, label, index and a
    dict of extras: with `sample_masks` its masks (`masks`), with `captions` the token ids of one
    of its captions (`text`).

    The masks are drawn first, so they depend on (seed, epoch, index) alone, not on the image
    (a crop's draws depend on its size): a file replaced by the next readable one keeps them."""

    def __init__(self, base: Dataset, crops: MultiCrop, augment: PhotometricAugment, seed: int,
                 captions: Optional[Captions] = None, sample_masks: Optional[SampleMasks] = None):
        self.base, self.crops, self.augment, self.seed = base, crops, augment, seed
        self.captions, self.sample_masks = captions, sample_masks

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        return self.make(self.base[index], epoch, index)

    def make(self, item: tuple, epoch: int, index: int) -> tuple:
        """A training sample from a data set item (image, label[, captions])."""
        image, label = item[:2]
        generator = sample_generator(self.seed, epoch, index)
        extras = self.draw_masks(generator)
        crops, params = self.crops(image, generator), self.augment.draw(generator)
        if self.captions is not None:
            extras["text"] = self.captions.tokens(item[2], generator)
        return crops, params, label, index, extras

    def draw_masks(self, generator: torch.Generator) -> dict:
        return {} if self.sample_masks is None else {"masks": self.sample_masks(generator)}


class EncodedViews(TrainingViews):
    """data.decode=device, item (epoch, index): the file's bytes (see `ImageFiles.encoded`), its
    crop boxes and photometric parameters drawn as TrainingViews draws them, label, index, epoch,
    the index of the file read and the extras (masks); `DeviceCrops` decodes and cuts the batch."""

    def __getitem__(self, key):
        epoch, index = key
        array, (width, height), label, file = self.base.encoded(index)
        generator = sample_generator(self.seed, epoch, index)
        extras = self.draw_masks(generator)
        boxes = torch.tensor(self.crops.boxes(width, height, generator))
        return array, boxes, self.augment.draw(generator), label, index, epoch, file, extras


class EvalViews(Dataset):
    """Item index: the image in the evaluation view, and its label."""

    def __init__(self, base: Dataset, view: CenterView):
        self.base, self.view = base, view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index][:2]
        return self.view(image), label


class ShardItems:
    """A raw sample of a tar shard -> a training sample, as TrainingViews makes from an item."""

    IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, views: TrainingViews, mode: str):
        self.views, self.mode = views, mode

    def __call__(self, sample: dict, epoch: int, index: int) -> tuple:
        image_bytes = next((sample[ext] for ext in self.IMAGE_EXTENSIONS if ext in sample), None)
        if image_bytes is None or "txt" not in sample:
            raise DataError(f"sample {sample['__key__']}: needs an image (.{'/.'.join(self.IMAGE_EXTENSIONS)}) "
                            f"and a caption (.txt)")
        image = open_image(io.BytesIO(image_bytes), self.mode)
        label = int(sample["cls"]) if "cls" in sample else -1
        return self.views.make((image, label, [sample["txt"].decode("utf-8")]), epoch, index)


class EpochLoader(DataLoader):
    """A loader over a ShardStream that tells the stream its epoch each time an epoch's iteration
    starts (Lightning sets the epoch of samplers only, and a stream has none)."""

    def __init__(self, *args, current_epoch: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch

    def __iter__(self):
        self.dataset.set_epoch(self.current_epoch())
        return super().__iter__()


class HeldOutPairs(Dataset):
    """Item index: the held-out image in the evaluation view, its label and its caption's token ids
    (for class-labelled data, one prompt drawn from (seed, index): the same every evaluation)."""

    def __init__(self, base: Dataset, view: CenterView, captions: Captions, seed: int):
        self.base, self.view, self.captions, self.seed = base, view, captions, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label, captions = self.base[index]
        return self.view(image), label, self.captions.tokens(captions, sample_generator(self.seed, 0, index))


def collate_extras(extras) -> dict:
    """The samples' extras as batch entries: caption tokens stacked, masks packed (a few
    tensors, one transfer to the device for the whole batch)."""
    batch = {}
    if "text" in extras[0]:
        batch["text"] = torch.stack([extra["text"] for extra in extras])
    if "masks" in extras[0]:
        batch["masks"] = pack_masks([extra["masks"] for extra in extras])
    return batch


def collate_views(samples):
    crops, params, labels, indices, extras = zip(*samples)
    return {
        "views": [torch.stack(view) for view in zip(*crops)],
        "photometric": [torch.stack(view) for view in zip(*params)],
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
        **collate_extras(extras),
    }


def collate_encoded(samples):
    arrays, boxes, params, labels, indices, epochs, files, extras = zip(*samples)
    return {
        # numpy arrays: the batch transfer leaves them where decode_jpeg wants them, on the CPU
        "encoded": {"data": list(arrays), "boxes": torch.stack(boxes), "epoch": torch.tensor(epochs),
                    "file": torch.tensor(files)},
        "photometric": [torch.stack(view) for view in zip(*params)],
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
        **collate_extras(extras),
    }


def collate_eval(samples):
    images, labels = [part for part in zip(*samples)][:2]
    batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
    if len(samples[0]) == 3:
        batch += (torch.stack([sample[2] for sample in samples]),)
    return batch


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
    def __init__(self, data_cfg, views_cfg, eval_cfg, processes: int, processes_per_node: int, seed: int,
                 captions: Optional[Captions] = None, upscaled: Optional[Upscaled] = None):
        super().__init__()
        self.captions = captions  # image-text methods
        self.upscaled = upscaled  # copies of crops at a higher resolution, batch["upscaled_views"]
        self.sample_masks: Optional[SampleMasks] = None  # the method's per-image masks, batch["masks"]
        self.cfg, self.views_cfg, self.eval_cfg = data_cfg, views_cfg, eval_cfg
        self.processes, self.seed = processes, seed
        self.per_process_batch = data_cfg.batch_size // processes
        self.resume = None  # (epoch, global batches done) from a checkpoint
        self.num_workers = (
            data_cfg.num_workers if data_cfg.num_workers is not None else default_num_workers(processes_per_node)
        )
        self.augment = PhotometricAugment(views_cfg, data_cfg.mean, data_cfg.std, upscaled)
        self.device_crops: Optional[DeviceCrops] = None  # data.decode=device, once the training loader exists
        self.splits: Optional[Splits] = None
        self.stream: Optional[ShardStream] = None  # data=webdataset, once its loader exists

    @property
    def decodes_on_device(self) -> bool:
        """data.decode=device (which validation allows for image folders only)."""
        return self.cfg.name == "imagefolder" and self.cfg.decode == "device"

    def load(self) -> Splits:
        """Open the data set (cheap checks first: called before training starts)."""
        if self.decodes_on_device and self.captions is not None:
            raise DataError("data.decode=device: image-text methods decode on the CPU; use data.decode=cpu")
        if self.splits is None:
            self.splits = build_splits(self.cfg)
            if self.captions is not None:
                self.splits.train = self._captioned(self.splits.train)
                if self.splits.heldout is not None:
                    self.splits.heldout = self._captioned(self.splits.heldout)
            log.info(
                "data %s: %d training images, %s held-out, %d classes",
                self.cfg.name, len(self.splits.train),
                len(self.splits.heldout) if self.splits.heldout is not None else "no",
                self.splits.num_classes,
            )
        return self.splits

    def _captioned(self, dataset: Dataset) -> Dataset:
        """Image-text pairs: caption files as they are, labelled images captioned by the prompts."""
        if isinstance(dataset, (CaptionFile, Shards)):
            return dataset
        if self.splits.class_names is None:
            raise DataError(f"data={self.cfg.name}: an image-text method needs captions or class names; use "
                            f"data=csv or data=webdataset, or a labelled data set (fashion_mnist, imagefolder, ...)")
        return ClassCaptions(dataset, self.splits.class_names, self.captions.prompts)

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
        views = TrainingViews(train, MultiCrop(self.views_cfg, self.upscaled), self.augment, self.seed, self.captions,
                              self.sample_masks)
        if isinstance(train, Shards):
            return self._stream_loader(train, views, rank)
        sampler = GlobalBatchSampler(len(train), self.per_process_batch, self.processes, rank, self.seed)
        if self.resume is not None:
            sampler.resume_at(*self.resume)
        if self.decodes_on_device:
            views = EncodedViews(train, views.crops, self.augment, self.seed, sample_masks=self.sample_masks)
            self.device_crops = DeviceCrops(views, self.cfg.channels)
            return self._loader(views, self.per_process_batch, collate_encoded, sampler)
        return self._loader(views, self.per_process_batch, collate_views, sampler)

    def _stream_loader(self, shards: Shards, views: TrainingViews, rank: int) -> DataLoader:
        self.stream = ShardStream(shards.files, self.per_process_batch, self.processes, rank, self.seed,
                                  shards.samples, ShardItems(views, IMAGE_MODES[self.cfg.channels]), collate_views,
                                  self.cfg.shuffle_buffer)
        self.stream.check_workers(self.num_workers)
        if self.resume is not None:
            self.stream.resume_at(*self.resume)
        pin_memory = self.cfg.pin_memory
        if pin_memory is None:
            pin_memory = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return EpochLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory,
                           persistent_workers=self.cfg.persistent_workers and self.num_workers > 0,
                           current_epoch=lambda: self.trainer.current_epoch if self.trainer is not None else 0)

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
        if splits.heldout is None or splits.num_classes == 0:
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

    def heldout_pairs_loader(self, rank: int, world: int) -> Optional[DataLoader]:
        """This rank's share of the held-out image-text pairs (the kNN queries' subset), batches
        of (uint8 images, labels, caption tokens); callers gather."""
        splits = self.load()
        if splits.heldout is None or self.captions is None:
            return None
        view = CenterView(self.cfg.image_size, self.cfg.eval_crop_fraction)
        pairs = HeldOutPairs(fixed_subset(splits.heldout, self.eval_cfg.knn.query_size, self.seed), view,
                             self.captions, self.seed)
        return self._loader(Subset(pairs, list(range(rank, len(pairs), world))), self.cfg.eval_batch_size,
                            collate_eval)

    def sample_images(self, count: int) -> torch.Tensor:
        """The first `count` held-out images (training images when there is no held-out split)
        with the evaluation view: uint8 [count, C, H, W], the same ones every time."""
        splits = self.load()
        source = splits.heldout if splits.heldout is not None else splits.train
        view = CenterView(self.cfg.image_size, self.cfg.eval_crop_fraction)
        return torch.stack([view(source[i][0]) for i in range(min(count, len(source)))])

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """As Lightning moves a batch, but what is read on the host stays there: the photometric
        parameters (the augmentation chooses each op's images from them) and a data.decode=device
        batch's files and crop boxes (`DeviceCrops`). Read on the device, each would make the host
        wait for it."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        host = {key: batch[key] for key in ("photometric", "encoded") if key in batch}
        rest = {key: value for key, value in batch.items() if key not in host}
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), **host}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "encoded" in batch:
            batch["views"] = self.device_crops(batch)
        if isinstance(batch, dict) and "views" in batch:
            views = self.augment(batch["views"], batch.pop("photometric"))
            recipe = len(self.augment.drawn)
            batch["views"] = views[:recipe]
            if self.upscaled:
                batch["upscaled_views"] = views[recipe:]
        return batch

    def skipped_images(self) -> int:
        sources = (self.load().train, self.load().heldout, self.stream)
        return sum(getattr(source, "skipped", 0) for source in sources)

"""Features of a data split, embedded once per (weights, data, view) and cached in the run dir.

A split is cut into batches of `batch_size` in data set order and each process embeds a
contiguous run of whole batches; the gathered rows are in data set order and every batch is the
one a single process would embed, so N processes give the features one does. Cached files,
`RUN_DIR/eval/features/<split>_<key>.safetensors`, hold `features` [N, D] and `labels` [N]; the key
hashes the weights file's bytes (or what else embeds: raw pixels, a seeded random init), the data
config (less its loader settings), the view and the subset, so a changed input never reuses them.
"""

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from sslrun.data.datamodule import collate_eval
from sslrun.data.transforms import CenterView, MultiCrop, sample_generator
from sslrun.distributed import gather_rows
from sslrun.distributed.gather import is_distributed, rank, world_size
from sslrun.run_dir import RunDir

log = logging.getLogger(__name__)

LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "download",
               "decode")
Features = Tuple[torch.Tensor, torch.Tensor]  # (features [N, D], labels [N])


class Center:
    """The evaluation view of training (resize, centre crop: data.image_size, data.eval_crop_fraction)."""

    def __init__(self, data: DictConfig):
        self.view = CenterView(data.image_size, data.eval_crop_fraction)
        self.describe = {"view": "center", "size": data.image_size, "crop_fraction": data.eval_crop_fraction}

    def __call__(self, image, index: int) -> torch.Tensor:
        return self.view(image)


class RandomCrop:
    """A random-resized crop (aspect 3/4-4/3) with a horizontal flip at p = 0.5, drawn for image
    `index` from (seed, draw): pass `draw` of a split is the same on any number of processes."""

    def __init__(self, size: int, scale: Sequence[float], seed: int, draw: int):
        spec = SimpleNamespace(size=size, scale=list(scale), ratio=[3 / 4, 4 / 3], flip_p=0.5, count=1)
        self.crop, self.seed, self.draw = MultiCrop([spec]), seed, draw
        self.recipe = {"view": "random_resized_crop+flip", "size": size, "scale": list(scale), "ratio": [0.75, 1.3333],
                       "flip_p": 0.5, "seed": seed}
        self.describe = {**self.recipe, "draw": draw}

    def __call__(self, image, index: int) -> torch.Tensor:
        return self.crop(image, sample_generator(self.seed, self.draw, index))[0]


class Viewed(Dataset):
    """Item i: (the view of image indices[i], its label)."""

    def __init__(self, base: Dataset, view: Callable, indices: Optional[Sequence[int]] = None):
        self.base, self.view = base, view
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]][:2]
        return self.view(image, self.indices[i]), label


def shard(size: int, batch_size: int) -> range:
    """This process's contiguous run of whole batches of a data set of `size` items."""
    batches = math.ceil(size / batch_size)
    first, last = batches * rank() // world_size(), batches * (rank() + 1) // world_size()
    return range(first * batch_size, min(size, last * batch_size))


@torch.no_grad()
def embed(model: Callable, dataset: Dataset, dim: int, batch_size: int, num_workers: int,
          device: torch.device, normalize: Callable) -> Features:
    """model(normalize(images)) [N, dim] over the whole data set and the labels, in data set order,
    every process's share gathered (on every process)."""
    part = torch.utils.data.Subset(dataset, shard(len(dataset), batch_size))
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_eval,
                        pin_memory=device.type == "cuda")
    features, labels = [torch.empty(0, dim, device=device)], [torch.empty(0, dtype=torch.long, device=device)]
    for images, batch_labels in loader:
        features.append(model(normalize(images.to(device, non_blocking=True))).float())
        labels.append(batch_labels.to(device))
    return gather_rows(torch.cat(features)).cpu(), gather_rows(torch.cat(labels)).cpu()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(data: DictConfig) -> dict:
    """The data config less what only changes how it is loaded."""
    return {k: v for k, v in OmegaConf.to_container(data, resolve=True).items() if k not in LOADER_KEYS}


class FeatureCache:
    """Features by (split, what embeds, view, subset), in RUN_DIR/eval/features/ (when enabled)."""

    def __init__(self, layout: RunDir, data: DictConfig, enabled: bool):
        self.layout, self.data, self.enabled = layout, data_identity(data), enabled

    def key(self, split: str, embedder: dict, view: dict, indices: Optional[Sequence[int]]) -> dict:
        subset = None if indices is None else hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()
        return {"split": split, "embedder": embedder, "data": self.data, "view": view, "subset": subset}

    def get(self, split: str, embedder: dict, view: dict, indices: Optional[Sequence[int]],
            compute: Callable[[], Features]) -> Features:
        from safetensors.torch import load_file, save_file

        key = self.key(split, embedder, view, indices)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.layout.feature_cache(split, digest)
        if self.enabled and path.is_file():
            log.info("%s features: %s (cached)", split, path)
            tensors = load_file(str(path))
            return tensors["features"], tensors["labels"]
        features, labels = compute()
        if self.enabled and rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".tmp")
            save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(partial),
                      metadata={"key": json.dumps(key, sort_keys=True)})
            os.replace(partial, path)
            log.info("%s features: %s", split, path)
        if is_distributed():  # every process has seen the file missing before any looks again
            dist.barrier()
        return features, labels

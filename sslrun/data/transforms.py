"""The per-image half of a view recipe: geometry, run in the DataLoader workers.

A recipe (augmentation config) is a list of crop specs. Each image gets `count` crops per spec,
each a random resized crop with a random horizontal flip, returned as uint8 CHW tensors. The
photometric half (colour jitter, greyscale, blur, solarize, normalisation) runs batched on the
training device, see `augment.py`: it is the expensive part and vectorises well, while crops of
differently sized source images must be cut one image at a time.
"""

import math
import random
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W] (no scaling: normalisation happens on the device)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class MultiCrop:
    """Cut every crop of a recipe from one image: global crops first, in spec order."""

    def __init__(self, views: Sequence):
        self.crops: List[Tuple[int, Tuple[float, float], Tuple[float, float], float]] = [
            (int(v.size), tuple(v.scale), tuple(v.ratio), float(v.flip_p))
            for v in views
            for _ in range(int(v.count))
        ]

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        return [self._crop(image, *crop) for crop in self.crops]

    @staticmethod
    def _crop(image, size, scale, ratio, flip_p) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, list(scale), list(ratio))
        crop = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
        if random.random() < flip_p:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(crop)


class CenterView:
    """Evaluation view: resize the short side to size / crop_fraction, then centre-crop `size`."""

    def __init__(self, size: int, crop_fraction: float):
        self.size = size
        self.resize_to = int(math.floor(size / crop_fraction + 0.5))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        if (width, height) != (self.size, self.size) or self.resize_to != self.size:
            scale = self.resize_to / min(width, height)
            new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
            image = image.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return to_tensor(image)

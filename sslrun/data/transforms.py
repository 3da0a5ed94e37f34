"""The per-image half of a view recipe: geometry, run in the DataLoader workers.

A recipe (augmentation config) is a list of crop specs. Each image gets `count` crops per spec,
each a random resized crop with a random horizontal flip, returned as uint8 CHW tensors. All
randomness comes from the generator passed in: one per image, seeded by its identity (see
`sample_generator`). The
photometric half (colour jitter, greyscale, blur, solarize, normalisation) runs batched on the
training device, see `augment.py`: it is the expensive part and vectorises well, while crops of
differently sized source images must be cut one image at a time.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W] (no scaling: normalisation happens on the device)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one image in one epoch of a run: the same whichever process, worker
    or batch it lands in, so runs on different numbers of processes see the same views."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            generator: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a random fraction `scale` of the image area
    with a random aspect ratio (log-uniform in `ratio`): torchvision's RandomResizedCrop rule
    (10 tries, then the largest centred crop the ratio range allows)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Upscaled(NamedTuple):
    """The first `crops` crops of a recipe cut a second time from the same boxes of the source
    image at `factor` times their size: a higher-resolution copy of the same view (DINOv3's Gram
    teacher), not an upsampled one."""

    crops: int
    factor: int


class MultiCrop:
    """Cut every crop of a recipe from one image: global crops first, in spec order, then the
    `upscaled` copies (if any), which draw nothing: the recipe's crops are the same with or without.

    `boxes` draws the crops' geometry from the image's size alone, so data.decode=device draws the
    same boxes from a JPEG header that the CPU path draws from the decoded image."""

    def __init__(self, views: Sequence, upscaled: Optional[Upscaled] = None):
        self.crops: List[Tuple[int, Tuple[float, float], Tuple[float, float], float]] = [
            (int(v.size), tuple(v.scale), tuple(v.ratio), float(v.flip_p))
            for v in views
            for _ in range(int(v.count))
        ]
        self.upscaled = upscaled

    @property
    def sizes(self) -> List[int]:
        sizes = [size for size, *_ in self.crops]
        return sizes + ([size * self.upscaled.factor for size in sizes[:self.upscaled.crops]] if self.upscaled else [])

    def boxes(self, width: int, height: int, generator: torch.Generator) -> List[Tuple[int, int, int, int, int]]:
        """(top, left, height, width, flipped) of every crop, drawn with `generator`."""
        boxes = [(*random_resized_crop_box(width, height, scale, ratio, generator),
                  int(float(torch.rand(1, generator=generator)) < flip_p))
                 for _, scale, ratio, flip_p in self.crops]
        return boxes + (boxes[:self.upscaled.crops] if self.upscaled else [])

    def __call__(self, image: Image.Image, generator: torch.Generator) -> List[torch.Tensor]:
        return [self._cut(image, size, box) for size, box in zip(self.sizes, self.boxes(*image.size, generator))]

    @staticmethod
    def _cut(image: Image.Image, size: int, box: Tuple[int, int, int, int, int]) -> torch.Tensor:
        top, left, height, width, flipped = box
        crop = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
        if flipped:
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

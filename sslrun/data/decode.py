"""data.decode=device: an image folder's JPEGs decoded and cropped on the training device.

The loader workers only read each file's bytes and draw its crop boxes and photometric parameters
(`EncodedViews`): the boxes need only the image's size, which the JPEG header gives, and they come
from the same generator, in the same order, as the CPU path's, so a run sees the same batches and
the same crops on any number of processes or workers. On the device the batch's JPEGs are decoded
in one batched `torchvision.io.decode_jpeg` call (nvjpeg on CUDA), then each crop is cut, resized
(bilinear with antialiasing: torch's counterpart of PIL's filter) and flipped; the photometric
step follows as in the CPU path. Other formats (PNG, ...) are decoded in the worker and cut on the
device with the rest. A JPEG the device cannot decode is decoded by PIL here, and one PIL cannot
read either is skipped and counted as in the CPU path: its item is made again, with the same
generator, from the next readable file. The crops differ from the CPU path's only where the
decoders or the two resize implementations round differently (tests/data/test_decode.py).
"""

import io
from typing import List, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from sslrun.data.datasets import IMAGE_MODES, open_image


def pil_grey(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [3, H, W] -> L [1, H, W] with PIL's integer ITU-R 601-2 weights, as convert("L")."""
    r, g, b = rgb.int().unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]


def _pixels(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Decoded pixels uint8 [H, W] or [H, W, C] -> [C, H, W] on `device`."""
    pixels = torch.from_numpy(array)
    return (pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)).to(device)


class DeviceCrops:
    """The uint8 crops [B, C, size, size] of a data.decode=device batch, on the device of its tensors."""

    def __init__(self, views, channels: int):
        self.views, self.channels = views, channels  # views: EncodedViews, to make an item again

    def __call__(self, batch: dict) -> List[torch.Tensor]:
        encoded = batch.pop("encoded")
        device = batch["index"].device
        images = self.decode(encoded["data"], device)
        for row, image in enumerate(images):
            while isinstance(image, Exception):
                image = self.replace(batch, encoded, row, image, device)
            images[row] = image
        return self.cut(images, encoded["boxes"].tolist())

    def decode(self, arrays: List[np.ndarray], device: torch.device) -> List[Union[torch.Tensor, Exception]]:
        """Each image in the data set's mode, uint8 [C, H, W] on `device`, or why it is unreadable."""
        images = [_pixels(array, device) if array.ndim > 1 else None for array in arrays]
        jpegs = [row for row, image in enumerate(images) if image is None]
        if jpegs:
            try:  # one call for the batch: nvjpeg's batched decoder on CUDA
                decoded = decode_jpeg([torch.from_numpy(arrays[row]) for row in jpegs], mode=ImageReadMode.RGB,
                                      device=device)
                decoded = [self._mode(image) for image in decoded]
            except RuntimeError:  # one bad file fails the whole call
                decoded = [self.decode_one(arrays[row], device) for row in jpegs]
            for row, image in zip(jpegs, decoded):
                images[row] = image
        return images

    def decode_one(self, array: np.ndarray, device: torch.device) -> Union[torch.Tensor, Exception]:
        """A JPEG file's image, decoded on `device`, else by PIL (what the CPU path decodes), or why
        it is unreadable; pixels the worker decoded as they are."""
        if array.ndim > 1:
            return _pixels(array, device)
        try:
            return self._mode(decode_jpeg(torch.from_numpy(array), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        try:
            return _pixels(np.array(open_image(io.BytesIO(array), IMAGE_MODES[self.channels])), device)
        except Exception as error:  # PIL raises many types for bad files
            return error

    def _mode(self, rgb: torch.Tensor) -> torch.Tensor:
        return pil_grey(rgb) if self.channels == 1 else rgb

    def replace(self, batch: dict, encoded: dict, row: int, error: Exception, device: torch.device):
        """Flag the row's file unreadable and make its item again from the next readable file, as
        the CPU path does; the new image (or why it is unreadable too). The item's masks stay:
        they do not depend on the file (`TrainingViews`)."""
        files = self.views.base
        file = int(encoded["file"][row])
        files.reader.flag(file, files.samples[file][0], error)
        array, boxes, params, label, _, _, file, _ = self.views[(int(encoded["epoch"][row]), int(batch["index"][row]))]
        encoded["boxes"][row], encoded["file"][row], batch["label"][row] = boxes, file, label
        for view, view_params in zip(batch["photometric"], params):
            view[row] = view_params
        return self.decode_one(array, device)

    def cut(self, images: List[torch.Tensor], boxes: list) -> List[torch.Tensor]:
        """Crop k of every image (boxes[row][k] = top, left, height, width, flipped), resized to
        crop k's size, as one batch per crop."""
        images = [image.float() for image in images]
        views = []
        for k, size in enumerate(self.views.crops.sizes):
            crops = torch.cat([
                F.interpolate(image[None, :, top:top + height, left:left + width], size=(size, size),
                              mode="bilinear", antialias=True, align_corners=False)
                for image, (top, left, height, width, _) in zip(images, (row[k] for row in boxes))
            ])
            flipped = torch.tensor([row[k][4] for row in boxes], dtype=torch.bool).to(crops.device, non_blocking=True)
            crops = torch.where(flipped.view(-1, 1, 1, 1), crops.flip(-1), crops)
            views.append(crops.round_().clamp_(0, 255).to(torch.uint8))
        return views

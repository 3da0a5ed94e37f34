"""The batched half of a view recipe: photometric augmentation on the training device.

Each image's random parameters are drawn in the DataLoader workers (`draw_photometric`) and
travel with the batch; each operation applies them to the whole batch at once, matching
torchvision's per-image functional ops (see tests/data/test_augment.py):

    brightness  x * b                                   b ~ U[1 - s, 1 + s]
    contrast    c * x + (1 - c) * mean(grey(x))         c ~ U[1 - s, 1 + s]
    saturation  s * x + (1 - s) * grey(x)               s ~ U[1 - s, 1 + s]
    hue         rotate HSV hue by h (closed form)       h ~ U[-s, s]
    greyscale   grey(x) = 0.2989 R + 0.587 G + 0.114 B   (ITU-R 601-2, as torchvision)
    blur        separable Gaussian, sigma ~ U[lo, hi], kernel 2 * ceil(3 * hi) + 1, reflect padding
    solarize    x -> 1 - x where x >= 0.5

Colour jitter applies its four ops in a random order per image, as torchvision does. Greyscale
inputs (one channel) skip the ops that need colour.
"""

import math
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from sslrun.data.transforms import Upscaled


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of RGB images in [0, 1] (identity for one channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def greyscale(x: torch.Tensor) -> torch.Tensor:
    """RGB images as their luma in all three channels."""
    return grey(x).expand_as(x)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_image(factor)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    factor = _per_image(factor)
    return (factor * x + (1 - factor) * grey(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue rotated by `shift` turns: torchvision's RGB -> HSV -> RGB round trip in closed
    form. With V = max(R, G, B), D = V - min(R, G, B) (= V S) and the hue H in sixths of a turn,
    channel n (R: 5, G: 3, B: 1) comes back as V - D clamp(min(k, 4 - k), 0, 1), where
    k = (n + H + 6 shift) mod 6. Saturation is never formed, and no per-sector choice is gathered:
    a few elementwise passes instead of HSV's 18 candidate planes (the round trip was half the cost
    of the photometric step at 224 px)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    inverse = 1.0 / torch.where(delta > 0, delta, torch.ones_like(delta))  # D = 0: grey, any hue gives V
    hue = torch.where(maxc == r, (g - b) * inverse,
                      torch.where(maxc == g, 2.0 + (b - r) * inverse, 4.0 + (r - g) * inverse))
    hue = hue + 6.0 * shift.view(-1, 1, 1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue + n, 6.0)
        channels.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def gaussian_kernel(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-image 1-D Gaussian weights [B, 2 * radius + 1], summing to 1. Tail weights below 1e-12
    are zeroed: they change no pixel in [0, 1] beyond float32's rounding, and for some sigmas
    below 0.5 px they are subnormal floats, whose products run several times slower on CPUs (a few
    such images made the batch's blur 3x slower at 224 px)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    return torch.where(kernel < 1e-12, 0.0, kernel)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (grouped convolution, reflect padding)."""
    batch, channels, height, width = x.shape
    kernel_size = min(kernel_size, 2 * ((min(height, width) - 1) // 2) + 1)
    radius = kernel_size // 2
    kernel = gaussian_kernel(sigma.to(x.dtype), radius).repeat_interleave(channels, dim=0)
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0.5, 1.0 - x, x)


# Layout of the per-image parameter vector drawn by `draw_photometric` and read by `augment`.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = slice(5, 9)  # the colour-jitter ops' order for this image (a permutation of 0..3)
GREY, BLUR, SIGMA, SOLARIZE = range(9, 13)
NUM_PARAMS = 13


def draw_photometric(spec, generator: torch.Generator) -> torch.Tensor:
    """One image's photometric parameters for a view spec, from `generator`: [NUM_PARAMS].

    Drawn per image in the DataLoader workers, from a generator seeded by the image's identity
    (data set index, epoch, run seed), so an image gets the same views whatever batch, process
    or worker it lands in. Always the same number of draws, whatever the spec's values."""
    u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
    order = torch.randperm(4, generator=generator).tolist()
    jitter = spec.color_jitter

    def between(value: float, low: float, high: float) -> float:
        return low + value * (high - low)

    return torch.tensor([
        float(u[0] < jitter.p),
        between(u[1], max(0.0, 1 - jitter.brightness), 1 + jitter.brightness),
        between(u[2], max(0.0, 1 - jitter.contrast), 1 + jitter.contrast),
        between(u[3], max(0.0, 1 - jitter.saturation), 1 + jitter.saturation),
        between(u[4], -jitter.hue, jitter.hue),
        *order,
        float(u[5] < spec.grayscale_p),
        float(u[6] < spec.blur_p),
        between(u[7], *spec.blur_sigma),
        float(u[8] < spec.solarize_p),
    ])


def _plain(spec):
    """A view spec with plain attributes: each value read from a DictConfig costs tens of
    microseconds, and `draw_photometric` reads fifteen per image and view."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, dict):
        return SimpleNamespace(**{key: _plain(value) for key, value in spec.items()})
    return spec


class PhotometricAugment:
    """Turns the uint8 crops of a recipe into normalised, augmented float views, batched."""

    def __init__(self, views: Sequence, mean: Sequence[float], std: Sequence[float],
                 upscaled: Optional[Upscaled] = None):
        self.drawn = [_plain(v) for v in views for _ in range(int(v.count))]  # a parameter set each
        # the upscaled copies (transforms.Upscaled) take their crop's spec and parameters, their
        # blur scaled with their size, so that a copy is the same view at a higher resolution
        self.upscaled = upscaled
        copies = self.drawn[:upscaled.crops] if upscaled else []
        self.specs = self.drawn + copies
        self.scales = [1] * len(self.drawn) + [upscaled.factor if upscaled else 1] * len(copies)
        self.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std)).view(1, -1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float, scaled to [0, 1] and standardised."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        mean, std = (moment.to(x.device, non_blocking=True) for moment in (self.mean, self.std))  # no wait on CUDA
        return (x - mean) / std

    def draw(self, generator: torch.Generator) -> List[torch.Tensor]:
        """One image's parameters for every crop of the recipe (and its upscaled copies')."""
        params = [draw_photometric(spec, generator) for spec in self.drawn]
        return params + (params[:self.upscaled.crops] if self.upscaled else [])

    def __call__(self, crops: List[torch.Tensor], params: List[torch.Tensor]) -> List[torch.Tensor]:
        """`crops[i]` uint8 [B, C, H, W] augmented with `params[i]` [B, NUM_PARAMS] (from `draw`) on
        the crops' device. The parameters are best left on the host, as the DataModule leaves them."""
        if len(crops) != len(self.specs) or len(params) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} crops and parameter sets, got {len(crops)} and {len(params)}")
        return [self.normalize(self.augment(crop.float() / 255.0, spec, p, scale))
                for crop, spec, p, scale in zip(crops, self.specs, params, self.scales)]

    @staticmethod
    def augment(x: torch.Tensor, spec, params: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Colour jitter (each image's ops in its own order), greyscale, blur (its sigma in pixels
        times `scale`: for a copy cut at `scale` times the spec's size), solarize.

        Which images each op changes is decided on the host, from host parameters, and sent to the
        device with the ops' per-image arguments in two small asynchronous copies. So the host never
        waits for the device: a device mask read on the host (`any()`, boolean indexing) would be a
        sync, a few hundred per step with DINO's 12 crops."""
        params = params.cpu()
        jitter = spec.color_jitter
        ops = [(adjust_brightness, jitter.brightness, BRIGHTNESS), (adjust_contrast, jitter.contrast, CONTRAST),
               (adjust_saturation, jitter.saturation, SATURATION), (adjust_hue, jitter.hue, HUE)]
        steps = []  # (the images it changes, op, their argument column or None), in the order applied
        if jitter.p > 0:
            jittered, order = params[:, JITTER] > 0, params[:, ORDER].long()
            for slot in range(4):
                steps += [(jittered & (order[:, slot] == op_index), op, column)
                          for op_index, (op, strength, column) in enumerate(ops) if strength > 0]
        if spec.grayscale_p > 0 and x.shape[1] == 3:
            steps.append((params[:, GREY] > 0, greyscale, None))
        if spec.blur_p > 0:
            kernel_size = 2 * math.ceil(3 * spec.blur_sigma[1] * scale) + 1
            steps.append((params[:, BLUR] > 0, lambda images, sigma: gaussian_blur(images, sigma * scale, kernel_size),
                          SIGMA))
        if spec.solarize_p > 0:
            steps.append((params[:, SOLARIZE] > 0, solarize, None))
        steps = [(mask.nonzero().flatten(), op, column) for mask, op, column in steps if mask.any()]
        if not steps:
            return x
        counts = [len(images) for images, _, _ in steps]
        indices = torch.cat([images for images, _, _ in steps]).to(x.device, non_blocking=True).split(counts)
        arguments = torch.cat([params[images, column] if column is not None else params.new_zeros(len(images))
                               for images, _, column in steps])  # zeros: the op takes no argument
        arguments = arguments.to(x.device, x.dtype, non_blocking=True).split(counts)
        x = x.clone()  # the caller's images stay as they were
        for images, argument, (_, op, column) in zip(indices, arguments, steps):
            chosen = x.index_select(0, images)
            x.index_copy_(0, images, op(chosen) if column is None else op(chosen, argument))
        return x

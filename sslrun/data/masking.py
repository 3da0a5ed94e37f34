"""Block-wise random masks for masked image modelling (BEiT, Bao et al. 2022; iBOT; DINOv2), and
I-JEPA's context and target blocks (`MultiBlock`).

A mask covers about `count` patches of a gh x gw grid with random rectangles: each rectangle has
an area drawn from [min_block, remaining] and a log-uniform aspect ratio in [ratio, 1 / ratio],
placed at random, until the target is met; when no rectangle fits any more, the remaining patches
are picked at random.

For a batch, DINOv2's rule: a fraction `probability` of the images is masked, with mask ratios
spread evenly over `ratio_range` (image i of n draws from the i-th of n equal sub-ranges), the
other images get empty masks, and the order is shuffled.
"""

import math
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


def block_mask(grid: Tuple[int, int], count: int, rng: random.Random, min_block: int = 4,
               aspect: float = 0.3, attempts: int = 10) -> torch.Tensor:
    """A bool mask [gh * gw] with `count` patches set, in rectangles as far as they fit."""
    height, width = grid
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_low, log_high = math.log(aspect), math.log(1 / aspect)
    while int(mask.sum()) < count:
        remaining = count - int(mask.sum())
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min(min_block, remaining), remaining)
            ratio = math.exp(rng.uniform(log_low, log_high))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if 0 < h <= height and 0 < w <= width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top:top + h, left:left + w]
                added = int((~block).sum())
                if 0 < added <= remaining:
                    block.fill_(True)
                    break
                added = 0
        if added == 0:
            break
    mask = mask.flatten()
    free = (~mask).nonzero()[:, 0].tolist()
    short = count - int(mask.sum())
    if short > 0:  # no rectangle fits any more: the rest at random, so the ratio is exact
        mask[rng.sample(free, short)] = True
    return mask


def batch_masks(batch: int, grid: Tuple[int, int], ratio_range: Sequence[float], probability: float,
                rng: random.Random) -> torch.Tensor:
    """Masks [batch, gh * gw] for one global crop of a batch (DINOv2's collate rule)."""
    patches = grid[0] * grid[1]
    masked = max(1, int(batch * probability)) if probability > 0 else 0
    low, high = ratio_range
    bounds = [low + (high - low) * i / max(masked, 1) for i in range(masked + 1)]
    masks = [block_mask(grid, max(1, int(patches * rng.uniform(bounds[i], bounds[i + 1]))), rng)
             for i in range(masked)]
    masks += [torch.zeros(patches, dtype=torch.bool)] * (batch - masked)
    rng.shuffle(masks)
    return torch.stack(masks)


# ---------------------------------------------------------------------------- I-JEPA's multi-block masks
@dataclass
class ContextAndTargets:
    """One image's I-JEPA masks as patch indices of its grid (row-major): the context the encoder
    sees (sorted) and the target blocks the predictor predicts (each row-major within its block)."""

    context: torch.Tensor
    targets: List[torch.Tensor]


def jepa_block(grid: Tuple[int, int], scale: Sequence[float], aspect: Sequence[float],
               rng: random.Random) -> torch.Tensor:
    """The patch indices of one rectangle: area `scale` (uniform in the range) of the grid, aspect
    h / w uniform in `aspect`, rounded, cut to the grid, placed uniformly (I-JEPA's
    `_sample_block_size`; a block may span the whole grid, where the reference keeps it a patch short)."""
    height, width = grid
    area = rng.uniform(*scale) * height * width
    ratio = rng.uniform(*aspect)
    h = min(height, max(1, round(math.sqrt(area * ratio))))
    w = min(width, max(1, round(math.sqrt(area / ratio))))
    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    rows = torch.arange(top, top + h)[:, None] * width
    return (rows + torch.arange(left, left + w)[None]).flatten()


@dataclass(frozen=True)
class MultiBlock:
    """I-JEPA's masks (Assran et al. 2023, sec. 3) on a `grid`: per image `targets` possibly
    overlapping blocks (scale 0.15-0.2, aspect 0.75-1.5 in the paper) and one context block (scale
    0.85-1, square) less every target patch, so the context never shows what is predicted. A
    context block with fewer than `min_context` patches left is drawn again (`attempts` times;
    then the context is every patch outside the targets).

    Every image draws its own sizes, and nothing is cut to a common length: the packed pass takes
    segments of any length (the reference collator draws one size per batch and truncates every
    context to the batch's shortest). Called with an image's sample generator, in the loader's
    workers (`data.datamodule.TrainingViews`): an image's masks depend on (seed, epoch, index)
    only, whichever process, worker or batch holds it."""

    grid: Tuple[int, int]
    targets: int
    target_scale: Tuple[float, float]
    target_aspect: Tuple[float, float]
    context_scale: Tuple[float, float]
    min_context: int = 4
    attempts: int = 20

    def __call__(self, generator: torch.Generator) -> ContextAndTargets:
        return self.draw(random.Random(int(torch.randint(2 ** 62, (), generator=generator))))

    def draw(self, rng: random.Random) -> ContextAndTargets:
        """One image's masks."""
        patches = self.grid[0] * self.grid[1]
        blocks = [jepa_block(self.grid, self.target_scale, self.target_aspect, rng) for _ in range(self.targets)]
        covered = torch.zeros(patches, dtype=torch.bool)
        for block in blocks:
            covered[block] = True
        for _ in range(self.attempts):
            area = torch.zeros(patches, dtype=torch.bool)
            area[jepa_block(self.grid, self.context_scale, (1.0, 1.0), rng)] = True
            context = (area & ~covered).nonzero()[:, 0]
            if len(context) >= self.min_context:
                return ContextAndTargets(context, blocks)
        return ContextAndTargets((~covered).nonzero()[:, 0], blocks)


def multiblock_masks(batch: int, grid: Tuple[int, int], targets: int, target_scale: Sequence[float],
                     target_aspect: Sequence[float], context_scale: Sequence[float],
                     rng: random.Random) -> List[ContextAndTargets]:
    """`MultiBlock`'s masks for `batch` images, drawn one after another from `rng`."""
    rule = MultiBlock(tuple(grid), targets, tuple(target_scale), tuple(target_aspect), tuple(context_scale))
    return [rule.draw(rng) for _ in range(batch)]


def pack_masks(masks: Sequence[ContextAndTargets]) -> dict:
    """A batch's masks as few tensors (what the loader collates: one transfer to the device, not
    one per image and block): every context, then every target block, concatenated, with their
    lengths as Python ints (left on the host, so splitting them needs no device sync)."""
    blocks = [block for mask in masks for block in mask.targets]
    return {"context": torch.cat([mask.context for mask in masks]),
            "context_lengths": [len(mask.context) for mask in masks],
            "targets": torch.cat(blocks),
            "target_lengths": [len(block) for block in blocks]}


def unpack_masks(packed: dict) -> List[ContextAndTargets]:
    """`pack_masks`' inverse: views of its tensors, on their device."""
    contexts = torch.split(packed["context"], packed["context_lengths"])
    blocks = torch.split(packed["targets"], packed["target_lengths"])
    per_image = len(blocks) // len(contexts)
    return [ContextAndTargets(context, list(blocks[i * per_image:(i + 1) * per_image]))
            for i, context in enumerate(contexts)]

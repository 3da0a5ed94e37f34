"""Block-wise random masks for masked image modelling (BEiT, Bao et al. 2022; iBOT; DINOv2).

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
from typing import Sequence, Tuple

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

"""`make bench`: I-JEPA's variable-length segments, packed, against truncation and padding.

Tokens: for the paper's masks (4 targets of 15-20 %, aspect 0.75-1.5; a context of 85-100 % less
the targets) on a 224 px image's grid, how many context and target tokens a batch keeps packed
(every one) and how many the reference collator's truncation to the batch's shortest would keep
of the same masks.

Speed: one I-JEPA step (context encoder, target encoder, predictor, loss, backward) packed, and
the same step with every context padded to the batch's longest and every target block to the
longest block (padding made of repeated patches: the tokens, and so the attention and MLP work, a
padded batch computes; equal lengths run as one dense batch). Timed in alternating pairs.

    python scripts/bench_ijepa.py [--backbone vit_tiny] [--image-size 224] [--batch 32] [--pairs 3]
"""

import argparse
import datetime
import json
import platform
import random
import statistics
import time

import torch

from sslrun.config import compose
from sslrun.data.masking import ContextAndTargets, multiblock_masks, pack_masks
from sslrun.optim import WarmupCosine
from sslrun.train import build_method


def token_counts(grid, batch: int, batches: int = 20) -> dict:
    """Mean per batch of the tokens kept packed and under truncation to the batch's shortest."""
    rng = random.Random(0)
    kept = {"context": [], "context_truncated": [], "target": [], "target_truncated": []}
    for _ in range(batches):
        masks = multiblock_masks(batch, grid, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), rng)
        contexts = [len(m.context) for m in masks]
        blocks = [len(b) for m in masks for b in m.targets]
        kept["context"].append(sum(contexts))
        kept["context_truncated"].append(min(contexts) * len(contexts))
        kept["target"].append(sum(blocks))
        kept["target_truncated"].append(min(blocks) * len(blocks))
    mean = {key: statistics.mean(values) for key, values in kept.items()}
    return {**mean, "context_kept_by_truncation": mean["context_truncated"] / mean["context"],
            "target_kept_by_truncation": mean["target_truncated"] / mean["target"]}


def padded(masks):
    """The same masks with every context and target block as long as the batch's longest."""
    longest_context = max(len(m.context) for m in masks)
    longest_block = max(len(b) for m in masks for b in m.targets)

    def pad(indices, length):
        return indices.repeat(-(-length // len(indices)))[:length]
    return [ContextAndTargets(pad(m.context, longest_context), [pad(b, longest_block) for b in m.targets])
            for m in masks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    cfg = compose(["method=ijepa", "recipe=none", f"backbone={args.backbone}", "data=imagefolder",
                   "data.root=synthetic", f"data.image_size={args.image_size}", f"data.batch_size={args.batch}",
                   "method.predictor.width=192", "method.predictor.depth=6", "method.predictor.heads=6"])
    torch.manual_seed(0)
    method = build_method(cfg, WarmupCosine(peak=1e-4, total_steps=100), None, steps_per_epoch=10)
    images = torch.randn(args.batch, cfg.data.channels, args.image_size, args.image_size)
    masks = method.draw_masks(args.batch, random.Random(0))
    layouts = {"packed": pack_masks(masks), "padded": pack_masks(padded(masks))}  # as batches bring them
    tokens = {name: len(layout["context"]) + len(layout["targets"]) for name, layout in layouts.items()}

    def step(layout):
        from sslrun.losses import ijepa_loss

        start = time.perf_counter()
        targets, _ = method.target_tokens(images, layout)
        ijepa_loss(method.predict(images, layout), targets).backward()
        method.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for layout in layouts.values():  # warm-up
        step(layout)
    times = {name: [] for name in layouts}
    for _ in range(args.pairs):
        for name, layout in layouts.items():
            times[name].append(step(layout))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "torch": torch.__version__, "backbone": cfg.backbone.name,
        "image_size": args.image_size, "grid": list(method.grid), "batch": args.batch,
        "attention": method.backbone.block_diagonal_attention.resolve(images.device),
        "tokens_per_batch": token_counts(method.grid, args.batch),
        "step_tokens": tokens, "step_sec": median, "padded_over_packed": median["padded"] / median["packed"],
    }, indent=2))


if __name__ == "__main__":
    main()

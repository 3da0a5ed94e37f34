"""`make bench` (loader): the images/s the data path sustains per loader worker on 224 px JPEGs, for
each view recipe and `data.decode`, against the images/s a training step consumes.

A generated ImageNet-style folder (`--images` JPEGs in 8 classes, sides 300-500 px, PIL quality 90;
colour fields, texture, hard-edged patches and grain, so they compress like photographs) is read
through sslrun's own DataModule as a run builds it (`data=imagefolder`, `recipe=none`: the paper's
views), for SimCLR's two 224 px views and DINO's multi-crop (2 x 224 + 10 x 96 px), with
`data.decode=cpu` and `data.decode=device`; and, when lightly is installed (`make peers`), the same
views as lightly's per-image pipeline: each image decoded by PIL and put through lightly's own view
transforms in the workers (`scripts/bench_peers.py`'s `lightly_views`), batched by the default
collate, as its loop loads them. Three rates, each after a warm-up:

1. loader: images/s of the training DataLoader alone, what the CPU workers do, with 0 (the main
   process), 1 and 2 workers; the 1-worker rate is the per-worker rate;
2. device step: images/s of the batch's part on the training device: its transfer
   (`transfer_batch_to_device`, as a run moves it) and `on_after_batch_transfer`, the batched
   photometric augmentation, and for data.decode=device the JPEG decoding and crops (lightly's
   batch arrives augmented: its transfer only, float32 views);
3. training step: images/s of the recipe's model on the device (SimCLR ResNet-50, DINO ViT-S/16
   with 65,536 prototypes): forward, loss, backward (no optimizer step).

The device runs 2 and 3 one after the other, so it consumes 1 / (1 / rate2 + 1 / rate3) images/s;
workers a device needs = that / the per-worker rate of 1. Results are appended to docs/benchmarks.md.

    python scripts/bench_loader.py [--images 512] [--batch 32] [--device cpu|cuda] [--step-batch N]
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sslrun.config import compose
from sslrun.data.datamodule import SSLDataModule
from sslrun.data.datasets import build_splits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
WORKERS = (0, 1, 2)  # 0: the main process
LIGHTLY = "lightly, per image"  # the pipeline column's name for lightly's loader
RECIPES = {"SimCLR, 2 x 224": ("simclr", "ResNet-50"), "DINO, 2 x 224 + 10 x 96": ("dino", "ViT-S/16")}


def noise(rng: np.random.Generator, width: int, height: int, cell: int, channels: int) -> np.ndarray:
    """Random values on a grid of `cell` px, bicubically interpolated, around 0: float [H, W, channels]."""
    grid = (rng.random((height // cell + 2, width // cell + 2, channels)) * 255).astype(np.uint8)
    field = Image.fromarray(grid[..., 0] if channels == 1 else grid).resize((width, height), Image.BICUBIC)
    return np.asarray(field, dtype=np.float32).reshape(height, width, channels) - 128


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields, texture at two scales, hard-edged patches and grain: a photograph's
    file size (ImageNet's JPEGs average about 110 KB)."""
    pixels = 128 + noise(rng, width, height, 32, 3) + 0.4 * noise(rng, width, height, 6, 1)
    pixels += 0.5 * noise(rng, width, height, 2, 1)
    for _ in range(6):
        h, w = rng.integers(height // 8, height // 2), rng.integers(width // 8, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        pixels[y:y + h, x:x + w] = pixels[y:y + h, x:x + w] * 0.5 + rng.random(3) * 128
    return Image.fromarray((pixels + rng.normal(0, 12, (height, width, 1))).clip(0, 255).astype(np.uint8))


def make_folder(root: Path, images: int) -> float:
    """`images` JPEGs in root/train/<class>/; their mean size in KiB."""
    rng = np.random.default_rng(0)
    for i in range(images):
        path = root / "train" / f"class{i % 8}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(int(rng.integers(300, 501)), int(rng.integers(300, 501)), rng).save(path, quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.jpg")) / images / 1024


def config(method: str, root: Path, batch: int, workers: int, decode: str):
    return compose([f"method={method}", "recipe=none", "data=imagefolder", f"data.root={root}",
                    f"data.batch_size={batch}", f"data.num_workers={workers}", f"data.decode={decode}",
                    "data.persistent_workers=false"])


def data_module(cfg) -> SSLDataModule:
    return SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, 1, 1, cfg.seed)


def lightly_loader(cfg) -> DataLoader:
    """lightly's per-image pipeline over the same folder: PIL decode, lightly's view transforms for
    the recipe's views, in `data.num_workers` workers, the default collate."""
    from bench_peers import _Transformed, lightly_views

    workers = cfg.data.num_workers
    return DataLoader(_Transformed(build_splits(cfg.data).train, lightly_views(cfg)), batch_size=cfg.data.batch_size,
                      shuffle=True, drop_last=True, num_workers=workers)


def loader_rate(cfg, pipeline: str) -> float:
    """Images/s of one epoch of the pipeline's training loader, its first batch (worker start-up) not
    timed. The main process reads with one torch thread, as each worker does (the rates compare)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = iter(lightly_loader(cfg) if pipeline == LIGHTLY else data_module(cfg).train_dataloader())
        next(batches)
        start, images = time.perf_counter(), 0
        for batch in batches:
            images += len(batch["index"] if isinstance(batch, dict) else batch[1])
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_step(module: SSLDataModule, batch, device: torch.device, pipeline: str):
    """The batch's part on the training device, as a run does it; sslrun's uint8 crops (None for lightly)."""
    batch = module.transfer_batch_to_device(batch, device, 0)
    if pipeline == LIGHTLY:
        return None
    if "encoded" in batch:
        batch["views"] = module.device_crops(batch)
    crops = batch["views"]
    module.on_after_batch_transfer(batch, 0)
    return crops


def host_syncs(step) -> int:
    """How often the host waits for the GPU while `step()` runs (CUDA's sync debug mode warns each time)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def device_rate(cfg, device: torch.device, batches: int, pipeline: str):
    """Images/s of the device step (the first batch not timed); sslrun's crops (uint8, before the
    photometric step) to compare the two decoders with; on CUDA, the host syncs of one device step."""
    module = data_module(cfg)
    source = lightly_loader(cfg) if pipeline == LIGHTLY else module.train_dataloader()
    loaded = [batch for _, batch in zip(range(batches + 1), source)]
    syncs = None
    if device.type == "cuda":
        try:
            syncs = host_syncs(lambda: device_step(module, loaded[0], device, pipeline))
        except RuntimeError as error:  # the count is an extra: the rates below still matter
            syncs = f"not counted ({error})"
    times, crops = [], []
    for batch in loaded:
        synchronize(device)
        start = time.perf_counter()
        uint8_crops = device_step(module, batch, device, pipeline)
        synchronize(device)
        times.append(time.perf_counter() - start)
        if uint8_crops is not None:
            crops.append([view.cpu() for view in uint8_crops])
    return cfg.data.batch_size / statistics.median(times[1:]), crops, syncs


def step_rate(method: str, root: Path, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of the method's training step (forward, loss, backward) at the recipe's crop sizes."""
    from sslrun.optim import WarmupCosine
    from sslrun.train import build_method

    cfg = config(method, root, batch, 0, "cpu")
    torch.manual_seed(0)
    model = build_method(cfg, WarmupCosine(peak=1e-4, total_steps=100), None, steps_per_epoch=10).to(device)
    sizes = [v.size for v in cfg.augmentation.views for _ in range(v.count)]
    views = [torch.randn(batch, 3, s, s, device=device) for s in sizes]
    times = []
    for _ in range(steps + 1):  # the first: warm-up
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.training_loss({"views": views}).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="loader batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-batch", type=int, help="training step batch (default: 4 on CPU, 128 on CUDA)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    step_batch = args.step_batch or (4 if device.type == "cpu" else 128)
    from bench import machine

    try:
        import lightly
        pipelines, lightly_note = ("cpu", "device", LIGHTLY), f"lightly {lightly.__version__}'s pipeline"
    except ImportError as error:  # lightly is the benchmark-only extra: `make peers`
        pipelines, lightly_note = ("cpu", "device"), f"lightly's pipeline not measured (lightly: {error})"
    rows, agreement, sync_counts, load = [], [], [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        kib = make_folder(root, args.images)
        print(f"{args.images} JPEGs, {kib:.0f} KiB each on average, in {time.perf_counter() - started:.0f} s",
              flush=True)
        for recipe, (method, model) in RECIPES.items():
            step = step_rate(method, root, step_batch, args.steps, device)
            print(f"{recipe}: {model} step {step:.1f} images/s", flush=True)
            crops = {}
            for pipeline in pipelines:
                decode = "cpu" if pipeline == LIGHTLY else pipeline
                loader = [loader_rate(config(method, root, args.batch, w, decode), pipeline) for w in WORKERS]
                on_device, crops[pipeline], syncs = device_rate(config(method, root, args.batch, 0, decode), device, 5,
                                                                pipeline)
                needed = 1 / (1 / on_device + 1 / step) / loader[1]
                rows.append((recipe, pipeline, loader, on_device, model, step, needed))
                if syncs is not None:
                    sync_counts.append(f"{recipe}, {pipeline}: {syncs}")
                print(f"  {pipeline}: loader {loader}, device step {on_device:.0f} images/s", flush=True)
            difference = torch.cat([(a.int() - b.int()).abs().flatten().float()
                                    for batch, other in zip(crops["cpu"], crops["device"])
                                    for a, b in zip(batch, other)])
            agreement.append(f"{recipe}: mean {difference.mean():.2f}, {100 * (difference > 1).float().mean():.1f}% "
                             f"of values off by more than 1")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "uncommitted"
    table = ["| recipe | pipeline | loader, main process | loader, 1 worker | loader, 2 workers (per worker) "
             "| device step | training step | workers per device |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, pipeline, loader, on_device, model, step, needed in rows:
        name = pipeline if pipeline == LIGHTLY else f"sslrun, data.decode={pipeline}"
        device_step = f"{on_device:.3g} (transfer only)" if pipeline == LIGHTLY else f"{on_device:.0f}"
        table.append(f"| {recipe} | {name} | {loader[0]:.0f} | {loader[1]:.0f} | {loader[2]:.0f} "
                     f"({loader[2] / 2:.0f}) | {device_step} | {step:.3g} ({model}) | {needed:.2g} |")
    section = f"""
## Loader throughput per worker against the training step, {datetime.date.today().isoformat()}

- Machine: {machine()}; training device `{device}`; load average (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} after
- Command: `make bench` / `python scripts/bench_loader.py --images {args.images} --batch {args.batch} --device {device.type} --step-batch {step_batch}` (commit {commit})
- Data: {args.images} generated JPEGs (sides 300-500 px, quality 90, {kib:.0f} KiB on average) in 8 class folders,
  read through sslrun's DataModule (`data=imagefolder recipe=none`) and, where named, {lightly_note}: PIL decode
  and lightly's view transforms per image in the workers, the default collate. Loader batch {args.batch}, one epoch
  per loader measurement (first batch not timed). All rates in images/s. Device step: the batch's transfer to
  `{device}` and `on_after_batch_transfer` (sslrun's photometric augmentation; with `data.decode=device` also
  decoding and crops; lightly's batch arrives augmented, as float32), median of 5 batches after one. Training
  step: forward, loss, backward at batch {step_batch}, {"bf16 autocast" if device.type == "cuda" else "fp32"}, median of {args.steps} steps after one.
- Workers per device = 1 / (1 / device step + 1 / training step) / per-worker rate (the 1-worker loader rate).
- The crops of the two decoders (uint8, before the photometric step, same batches): {"; ".join(agreement)}.
{f"- Host syncs in one batch's device step (CUDA's sync debug mode): {'; '.join(sync_counts)}.{chr(10)}" if sync_counts else ""}
{chr(10).join(table)}
"""
    with open(args.output, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()

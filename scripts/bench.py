"""`make bench`: SimCLR training throughput through sslrun vs a bare PyTorch loop doing the same step.

Both read the same data through the same loader and batched augmentation, run the same model,
loss and optimizer, and are timed the same way (wall time between consecutive steps, data loading
included, the first 5 steps skipped). The difference is the framework: Lightning's loop, logging,
checkpoint callbacks and the method plumbing. Runs alternate (bare, sslrun, bare, sslrun, ...) and
the medians are compared. Results are appended to docs/benchmarks.md.

    python scripts/bench.py [--steps 30] [--repeats 2] [OVERRIDES ...]
"""

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sslrun.__main__ import CONF_DIR
from sslrun.config import validate
from sslrun.data.datamodule import SSLDataModule
from sslrun.losses import nt_xent_loss
from sslrun.models.backbones import build_backbone
from sslrun.models.heads import MLPHead
from sslrun.optim import build_optimizer, parameter_groups
from sslrun.train import lr_schedule, run

REPO = Path(__file__).resolve().parents[1]
SKIP = 5


def bare_loop(cfg, steps: int) -> float:
    """The same SimCLR step in plain PyTorch: no Lightning, no callbacks, no logging."""
    torch.manual_seed(cfg.seed)
    data = SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, 1, 1, cfg.seed)
    schedule, _ = lr_schedule(cfg, data.train_size)
    backbone = build_backbone(cfg.backbone, in_chans=cfg.data.channels)
    projector = MLPHead.from_spec(backbone.num_features, cfg.method.projector)
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projector}).train()
    groups = parameter_groups(model.named_parameters(), cfg.optimizer.weight_decay,
                              cfg.optimizer.exclude_bias_and_norm)
    optimizer = build_optimizer(cfg.optimizer, groups, schedule(0))
    timed_seconds, timed_images, last = 0.0, 0, time.perf_counter()
    for step, batch in enumerate(data.train_dataloader()):
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        views = data.augment(batch["views"])
        features = backbone(torch.cat(views))
        z1, z2 = projector(features).chunk(2)
        loss = nt_xent_loss(z1, z2, cfg.method.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # Lightning reads the loss every step too
        now = time.perf_counter()
        if step >= SKIP:
            timed_seconds += now - last
            timed_images += cfg.data.batch_size
        last = now
    return timed_images / timed_seconds


def framework(cfg, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        return run(cfg, run_dir=run_dir)["images_per_sec"]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(__import__("os").sched_getaffinity(0))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({cpu}, {cores} cores)"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["backbone=resnet18", "eval.enabled=false", "trainer.progress_bar=false",
                 f"trainer.max_steps={args.steps}", "trainer.checkpoint_every_n_steps=100000", *args.overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=overrides))

    bare, sslrun = [], []
    for repeat in range(args.repeats):
        bare.append(bare_loop(cfg, args.steps))
        sslrun.append(framework(cfg, args.steps))
        print(f"repeat {repeat + 1}: bare {bare[-1]:.1f} img/s, sslrun {sslrun[-1]:.1f} img/s", flush=True)
    bare_median, sslrun_median = statistics.median(bare), statistics.median(sslrun)
    overhead = 100 * (1 - sslrun_median / bare_median)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "uncommitted"
    command = "make bench" + (f' ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else "")
    section = f"""
## SimCLR {cfg.backbone.name} training throughput, {datetime.date.today().isoformat()}

- Machine: {machine()}
- Command: `{command}` (commit {commit})
- Setup: {cfg.data.name} ({cfg.data.image_size}px), global batch {cfg.data.batch_size}, {cfg.optimizer.name},
  {args.steps} steps per run (first {SKIP} not timed), {args.repeats} alternating repeats, medians.
  Both sides use the same DataLoader ({'auto' if cfg.data.num_workers is None else cfg.data.num_workers} workers),
  batched augmentation, model, loss and optimizer; images/sec includes data loading.

| loop | images/sec (median) | runs |
| --- | --- | --- |
| bare PyTorch | {bare_median:.1f} | {', '.join(f'{v:.1f}' for v in bare)} |
| sslrun (Lightning) | {sslrun_median:.1f} | {', '.join(f'{v:.1f}' for v in sslrun)} |

Framework overhead: **{overhead:.1f}%** (target: under 5%).
"""
    output = Path(args.output)
    if not output.exists():
        output.write_text("# Benchmarks\n\nMeasured results, newest last. Each section gives machine, command and date.\n")
    with open(output, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()

"""`make bench`: SimCLR training throughput through sslrun vs a bare PyTorch loop doing the same step.

Both loops read the same data through the same loader and batched augmentation, run the same
model, loss and optimizer, and are timed the same way: wall time between consecutive steps, data
loading included, the first 5 steps skipped, the median step time of each run. The difference is
the framework: Lightning's loop, logging, checkpoint callbacks and the method plumbing.

Two measurements, each alternating bare and sslrun runs:
1. ResNet-18, batch 256: images/sec of each loop and the median of the paired ratios.
2. The framework's fixed cost per step, measured on a tiny ResNet (8 channels, batch 32) whose
   step is short enough for milliseconds to show, then put against the ResNet-18 step time.
   On a shared machine (1) moves by several percent from run to run; (2) is the precise number.

Results are appended to docs/benchmarks.md.

    python scripts/bench.py [--steps 15] [--repeats 5] [OVERRIDES ...]
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from sslrun.config import compose
from sslrun.data.datamodule import SSLDataModule
from sslrun.losses import nt_xent_loss
from sslrun.models.backbones import build_backbone
from sslrun.models.heads import MLPHead
from sslrun.optim import build_optimizer, parameter_groups
from sslrun.train import lr_schedule, run

REPO = Path(__file__).resolve().parents[1]
SKIP = 5
TINY = ["backbone.timm_kwargs={channels:[8,8,8,8]}", "data.batch_size=32", "method.projector.hidden_dim=32"]


def median_step(batch_ends) -> float:
    return statistics.median(b - a for a, b in zip(batch_ends[SKIP:], batch_ends[SKIP + 1:]))


class StepTimer(L.Callback):
    def __init__(self):
        self.batch_ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_ends.append(time.perf_counter())


def bare_loop(cfg) -> float:
    """Median step time of the same SimCLR step in plain PyTorch: no Lightning, no callbacks."""
    torch.manual_seed(cfg.seed)
    data = SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, 1, 1, cfg.seed)
    schedule, _ = lr_schedule(cfg, data.train_size)
    backbone = build_backbone(cfg.backbone, in_chans=cfg.data.channels)
    projector = MLPHead.from_spec(backbone.num_features, cfg.method.projector)
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projector}).train()
    groups = parameter_groups(model.named_parameters(), cfg.optimizer.weight_decay,
                              cfg.optimizer.exclude_bias_and_norm)
    optimizer = build_optimizer(cfg.optimizer, groups, schedule(0))
    batch_ends = []
    for step, batch in enumerate(data.train_dataloader()):
        if step == cfg.trainer.max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        views = data.on_after_batch_transfer(batch, 0)["views"]
        features = backbone(torch.cat(views))
        z1, z2 = projector(features).chunk(2)
        loss = nt_xent_loss(z1, z2, cfg.method.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # Lightning reads the loss every step too
        batch_ends.append(time.perf_counter())
    return median_step(batch_ends)


def framework(cfg) -> float:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        run(cfg, run_dir=run_dir, callbacks=[timer])
    return median_step(timer.batch_ends)


def alternate(cfg, repeats: int, label: str):
    bare, sslrun = [], []
    for repeat in range(repeats):
        bare.append(bare_loop(cfg))
        sslrun.append(framework(cfg))
        print(f"{label} {repeat + 1}/{repeats}: bare {1000 * bare[-1]:.1f} ms/step, "
              f"sslrun {1000 * sslrun[-1]:.1f} ms/step", flush=True)
    return bare, sslrun


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({cpu}, {cores} cores)"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = ["eval.enabled=false", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=100000"]
    cfg = compose(["backbone=resnet18", f"trainer.max_steps={args.steps}", *common, *args.overrides])
    probe_cfg = compose([*TINY, "trainer.max_steps=60", *common, *args.overrides])

    bare, sslrun = alternate(cfg, args.repeats, "resnet18")
    ratios = [b / s for b, s in zip(bare, sslrun)]  # sslrun throughput / bare throughput
    probe_bare, probe_sslrun = alternate(probe_cfg, 3, "fixed cost")
    fixed_ms = 1000 * (statistics.median(probe_sslrun) - statistics.median(probe_bare))
    step_ms = 1000 * statistics.median(sslrun)
    batch = cfg.data.batch_size

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "uncommitted"
    command = "make bench" + (f' ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else "")
    rows = "\n".join(
        f"| {i + 1} | {batch / b:.1f} | {batch / s:.1f} | {r:.3f} |"
        for i, (b, s, r) in enumerate(zip(bare, sslrun, ratios))
    )
    section = f"""
## SimCLR {cfg.backbone.name} training throughput, {datetime.date.today().isoformat()}

- Machine: {machine()}
- Command: `{command}` (commit {commit})
- Setup: {cfg.data.name} ({cfg.data.image_size}px), global batch {batch}, {cfg.optimizer.name}, one process;
  {args.steps} steps per run (first {SKIP} not timed), {args.repeats} alternating pairs of runs. Both loops
  use the same DataLoader, batched augmentation, model, loss and optimizer; a step's time includes data
  loading; each run is summarised by its median step time.

| pair | bare PyTorch images/s | sslrun images/s | sslrun / bare |
| --- | --- | --- | --- |
{rows}

- Median ratio: **{statistics.median(ratios):.3f}**, i.e. framework overhead
  **{100 * (1 - statistics.median(ratios)):.1f}%** (target: under 5%); run-to-run spread on this machine:
  bare {batch / max(bare):.0f}-{batch / min(bare):.0f} images/s.
- Fixed framework cost per step (tiny ResNet, batch 32, 60 steps, 3 pairs): sslrun
  {1000 * statistics.median(probe_sslrun):.1f} ms vs bare {1000 * statistics.median(probe_bare):.1f} ms,
  **{fixed_ms:+.1f} ms per step**, which is **{100 * fixed_ms / step_ms:.2f}%** of the ResNet-18 step ({step_ms:.0f} ms).
"""
    output = Path(args.output)
    if not output.exists():
        output.write_text("# Benchmarks\n\nMeasured results, newest last. Each section gives machine, command "
                          "and date.\n")
    with open(output, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()

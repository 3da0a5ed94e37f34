"""`make bench`: one training step compiled (`trainer.compile`, regional) against eager.

For each method's quick recipe (SimCLR on a ResNet, DINO's packed multi-crop ViT): the first
compiled step (compilation included), then steps of the eager and the compiled model (and, for a
ResNet, the eager model in channels-last memory format) in alternating rounds on the same batch
(forward, backward and the optimizer step), median seconds.
The compiled and eager losses of every step are reported side by side (they must agree to float
rounding). On a GPU machine, `--device cuda` measures the same there.

    python scripts/bench_compile.py [--methods simclr dino] [--batch 64] [--pairs 5] [--device cpu]
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sslrun.config import compose
from sslrun.distributed.compile import compile_method, use_channels_last
from sslrun.train import build_method, lr_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine  # noqa: E402  (the machine line every benchmark records)


def build(method: str, batch: int, device: str):
    cfg = compose([f"method={method}", f"data.batch_size={batch}"])
    schedule, steps_per_epoch = lr_schedule(cfg, 60000)
    torch.manual_seed(0)
    model = build_method(cfg, schedule, None, steps_per_epoch).to(device)
    return model, model.configure_optimizers(), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "dino"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    for name in args.methods:
        eager, eager_optimizer, cfg = build(name, args.batch, args.device)
        compiled, compiled_optimizer, _ = build(name, args.batch, args.device)
        regions = compile_method(compiled)
        models = {"eager": (eager, eager_optimizer), "compiled": (compiled, compiled_optimizer)}
        channels_last, channels_last_optimizer, _ = build(name, args.batch, args.device)
        if use_channels_last(channels_last):
            models["eager channels-last"] = (channels_last, channels_last_optimizer)
        generator = torch.Generator().manual_seed(0)
        batch = {"views": [torch.randn(args.batch, cfg.data.channels, view.size, view.size, generator=generator)
                           .to(args.device) for view in cfg.augmentation.views for _ in range(view.count)]}

        def step(model, optimizer, seed):
            torch.manual_seed(seed)
            start = time.perf_counter()
            loss = model.training_loss(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.after_optimizer_step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, loss.item()

        first_compiled, _ = step(compiled, compiled_optimizer, 0)
        for key, (model, optimizer) in models.items():
            if key != "compiled":
                step(model, optimizer, 0)
        times, losses = {key: [] for key in models}, []
        for round_ in range(1, args.pairs + 1):
            round_losses = {}
            for key, (model, optimizer) in models.items():
                seconds, round_losses[key] = step(model, optimizer, round_)
                times[key].append(seconds)
            losses.append(round_losses)
        median = {key: statistics.median(values) for key, values in times.items()}
        rows.append({"method": name, "backbone": cfg.backbone.name, "batch": args.batch, "regions": regions,
                     "first_compiled_step_sec": first_compiled, "step_sec": median,
                     "compiled_over_eager": median["compiled"] / median["eager"], "losses": losses})
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(),
                      "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Per-process memory of parameters, gradients and optimizer state: trainer=ddp vs trainer=fsdp.

For each method x backbone at its paper's scale (DINO ViT-S/16 with 65,536 prototypes, SimCLR
ResNet-50), 2 CPU processes (gloo) build the method as `python -m sslrun` does, shard it with
sslrun's FSDP plan (or leave it whole, as DDP does), give every trainable parameter a gradient and
take one optimizer step at lr 0 so the optimizer allocates its state. Then each process adds up
the bytes of the tensors it holds: parameters (local shards under FSDP), gradients and optimizer
state. Activations are not counted: they depend on batch and crops, not on the strategy.

    python scripts/bench_memory.py [--world 2]

Results are appended to docs/benchmarks.md.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "DINO ViT-S/16 (65,536 prototypes)": ["method=dino", "recipe=imagenet", "backbone=vit_small"],
    "SimCLR ResNet-50": ["method=simclr", "recipe=imagenet", "backbone=resnet50"],
}


def local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def measure(overrides, sharded: bool, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from sslrun.config import compose
    from sslrun.distributed.fsdp import fsdp_options, shard_method
    from sslrun.train import build_method, lr_schedule

    cfg = compose([*overrides, "data.root=/unused", "trainer=ddp", f"trainer.devices={world}", "eval.enabled=false"])
    torch.manual_seed(0)
    schedule, steps_per_epoch = lr_schedule(cfg, 1_281_167)  # ImageNet's training split
    method = build_method(cfg, schedule, None, steps_per_epoch)
    if sharded:
        shard_method(method, fsdp_options(init_device_mesh("cpu", (world,))))
    optimizer = method.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    trainable = [p for p in method.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "parameters": sum(local_bytes(p) for p in method.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in trainable),
        "optimizer": sum(local_bytes(t) for t in state),
        "count": sum(p.numel() for p in method.parameters()),
    }


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {case: {strategy: measure(overrides, strategy == "fsdp", world) for strategy in ("ddp", "fsdp")}
               for case, overrides in CASES.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(args.world, _free_port(), out), nprocs=args.world, start_method="spawn")
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.world)]
    mib = 2 ** 20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        f"## Per-process parameter, gradient and optimizer-state memory: DDP vs FSDP, {datetime.date.today()}",
        "",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{args.world} processes (gloo)",
        f"- Command: `make bench` / `python scripts/bench_memory.py --world {args.world}` (commit {commit})",
        "- Method: each process builds the method at its paper's scale as `python -m sslrun` does (recipe=imagenet),",
        "  shards it with sslrun's FSDP plan (trainer=fsdp) or keeps it whole (trainer=ddp), gives every trainable",
        "  parameter a gradient and takes one optimizer step at lr 0 so the optimizer allocates its state, then adds",
        "  up the bytes of the tensors it holds (local shards under FSDP). fp32. Largest process shown. Activations",
        "  are not counted (they depend on batch and crops, not on the strategy).",
        "",
        "| model | parameters (all) | strategy | params MiB | grads MiB | optimizer MiB | total MiB | FSDP / DDP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        totals = {}
        for strategy in ("ddp", "fsdp"):
            worst = max((r[case][strategy] for r in ranks),
                        key=lambda m: m["parameters"] + m["gradients"] + m["optimizer"])
            total = worst["parameters"] + worst["gradients"] + worst["optimizer"]
            totals[strategy] = total
            ratio = f"{total / totals['ddp']:.3f}" if strategy == "fsdp" else ""
            lines.append(f"| {case} | {worst['count'] / 1e6:.1f} M | {strategy} | {worst['parameters'] / mib:.1f} | "
                         f"{worst['gradients'] / mib:.1f} | {worst['optimizer'] / mib:.1f} | {total / mib:.1f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.output, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

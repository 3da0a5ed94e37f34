"""`make bench` (part 2): a DINO training step with multi-crop, packed vs unpacked, per backend.

One DINO step (teacher on the global crops, student on all crops, loss, backward) of a ViT at the
paper's crop sizes, timed for every attention backend that can train on this device, with the
crops packed into one sequence (`method.pack_crops=true`) and unpacked (one batch per crop size,
DINO's reference code). Each configuration runs in its own process so its peak memory is its own:
CUDA max allocated on a GPU; on a CPU the peak resident set minus the resident set before the
first step (activations and gradients; the process's baseline excluded).

    python scripts/bench_multicrop.py [--backbone vit_small] [--batch 8] [--steps 3]
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_configuration(args) -> dict:
    """Runs in a child process: build the method, time `steps` steps after one warm-up step."""
    import resource

    import torch

    from sslrun.config import compose
    from sslrun.optim import WarmupCosine
    from sslrun.train import build_method

    cfg = compose(["method=dino", "recipe=none", f"backbone={args.backbone}", "data=imagefolder",
                   "data.root=synthetic", "data.image_size=224",
                   f"backbone.attention={args.attention}", f"method.pack_crops={args.packed}",
                   f"data.batch_size={args.batch}", "method.head.out_dim=65536"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    method = build_method(cfg, WarmupCosine(peak=1e-4, total_steps=100), None, steps_per_epoch=10).to(device)
    sizes = [v.size for v in cfg.augmentation.views for _ in range(v.count)]
    views = [torch.randn(args.batch, cfg.data.channels, s, s, device=device) for s in sizes]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = method.training_loss({"views": views}).loss
        loss.backward()
        method.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()  # warm-up: backend choice, kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"step_ms": 1000 * statistics.median(times), "peak_mb": peak,
            "backend": method.backbone.block_diagonal_attention.name}


def trainable_backends(device) -> dict:
    """backend -> None when it can train on `device` (a tiny forward + backward runs), else why not.

    An installed xformers may lack kernels for this GPU or this torch, so it is tried, not assumed."""
    import torch

    from sslrun.models.attention import BACKENDS, IMPLEMENTATIONS, Packing, unavailable_reason

    reasons = {}
    for name in (b for b in BACKENDS if b != "auto"):
        reason = unavailable_reason(name, device)
        if reason is None and name == "flex" and device.type == "cpu":
            reason = "torch's flex_attention has no backward on CPU"
        if reason is None:
            try:
                q = torch.randn(1, 2, 8, 16, device=device, requires_grad=True)
                IMPLEMENTATIONS[name](q, q, q, Packing((4, 4))).sum().backward()
            except Exception as error:  # noqa: BLE001 - any failure: not this backend
                lines = f"{type(error).__name__}: {error}".strip().splitlines()
                reason = lines[0][:300]
        reasons[name] = reason
    return reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--child", nargs=2, metavar=("ATTENTION", "PACKED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.attention, args.packed = args.child
        print(json.dumps(one_configuration(args)))
        return

    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from bench import machine

    cuda = torch.cuda.is_available()
    reasons = trainable_backends(torch.device("cuda" if cuda else "cpu"))
    backends = [name for name, reason in reasons.items() if reason is None]
    skipped = {name: reason for name, reason in reasons.items() if reason is not None}
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", flush=True)
    results = []
    for attention in backends:
        for packed in ("true", "false"):
            child = subprocess.run(
                [sys.executable, __file__, "--backbone", args.backbone, "--batch", str(args.batch),
                 "--steps", str(args.steps), "--child", attention, packed],
                capture_output=True, text=True, cwd=REPO)
            if child.returncode != 0:
                reason = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "failed"
                sys.exit(f"{attention} packed={packed} failed: {reason}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{attention} packed={packed}: {result}", flush=True)
            results.append((attention, packed, result))

    rows = []
    for attention in backends:
        got = {packed: result for a, packed, result in results if a == attention}
        p, u = got["true"], got["false"]
        rows.append(f"| {attention} | {p['step_ms']:.0f} | {u['step_ms']:.0f} | {u['step_ms'] / p['step_ms']:.2f}x "
                    f"| {p['peak_mb']:.0f} | {u['peak_mb']:.0f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "uncommitted"
    memory = "CUDA max allocated" if cuda else "peak resident set above the pre-step baseline"
    section = f"""
## DINO multi-crop step, packed vs unpacked, {datetime.date.today().isoformat()}

- Machine: {machine()}
- Command: `make bench` / `python scripts/bench_multicrop.py --backbone {args.backbone} --batch {args.batch}` (commit {commit})
- Setup: one DINO step (teacher on 2 global crops, student on 2 x 224 px + 10 x 96 px crops, loss, backward),
  {args.backbone}, 65536 prototypes, batch {args.batch}, {"bf16 autocast" if cuda else "fp32"}; median of {args.steps} steps after
  one warm-up step; each configuration in its own process. Peak memory: {memory}.
- Skipped (cannot train here): {"; ".join(f"{n}: {r}" for n, r in skipped.items()) or "none"}

| attention | packed ms/step | unpacked ms/step | packed speed-up | packed peak MB | unpacked peak MB |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    with open(args.output, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()

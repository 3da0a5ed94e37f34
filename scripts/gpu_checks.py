"""GPU checks: what the CPU test suite and `make bench` cannot show, in one short run on one GPU.

    python scripts/gpu_checks.py --out DIR              # on a CUDA machine (legs 1-6: about 4 minutes on an H200)
    python scripts/gpu_checks.py --out DIR --cpu-smoke  # tiny shapes on CPU: only checks that it runs

Eight legs, each written to DIR/gpu_checks.json and DIR/gpu_checks.md as soon as it ends (so an
interrupted run still leaves what it measured):

1. equivalence: the packed multi-crop ViT forward (`sslrun.models.vit.packed_forward`) against
   timm's own per-crop `forward_features`, outputs and parameter gradients, for every attention
   backend that runs here (xformers, flex, sdpa, math), in fp32 (TF32 off) and under bf16 autocast.
   ViT-S/16 with 2 x 224 + 4 x 96 + 1 x 112 px crops, batch 4. Error = max |got - expected| /
   max |expected| per tensor, the worst tensor reported. bf16 is judged against fp32: the packed bf16
   pass must be no further from timm's fp32 result than twice timm's own bf16 pass is (+1e-3).
2. multicrop: `scripts/bench_multicrop.py`'s DINO step (ViT-S/16, 65,536 prototypes, 2 x 224 +
   10 x 96 px crops, bf16 autocast), packed vs unpacked, per backend: median step time and CUDA max
   allocated. Each configuration runs in this process after `torch._dynamo.reset()` and with the
   CUDA peak counter reset, which measures what a fresh process would (max allocated counts live
   tensors only, not the allocator's cache).
3. checkpointing: a ViT-S/16 forward + backward at batch 64 (224 px: timm's `forward_features`;
   and the packed DINO student pass over 2 x 224 + 10 x 96 px crops), bf16 autocast, with and without
   `sslrun.distributed.fsdp.checkpoint_activations`, and with it under
   `torch.utils.checkpoint.set_checkpoint_early_stop(False)`: CUDA max allocated and step time.
4. fsdp: `python -m sslrun method=dino trainer=fsdp trainer.devices=1 trainer.accelerator=gpu
   trainer.fsdp.param_dtype=bf16 trainer.max_steps=20` (ViT-S/16, 224 px, batch 64, online
   evaluation on) on a generated folder of random images; it must end with summary.json. Then the
   same with `trainer.fsdp.activation_checkpointing=true`, and CLIP (`method=clip`: ViT-B/16 image tower
   and the paper's text tower, the folder's images captioned from their class names by `method.prompts`)
   the same way, if the time budget allows.

5. flex_drop_path: flex_attention under efficient stochastic depth (each block attends over a random
   subset of the crops, so the packed length changes from call to call; sslrun compiles those calls
   for dynamic shapes, since shape-specialised compilation recompiles at every new length until
   torch._dynamo's limit of 8 and then runs flex unfused). ViT-S/16, drop path 0.1, batch 8, forward
   + backward, against sdpa: graphs compiled, recompile-limit hits, step times, exactness on new
   lengths. Optional: skipped when the time budget is spent.
6. block_mask: flex's block mask for one packed DINO student batch (64 x (2 x 197 + 10 x 37) =
   48,896 tokens): sslrun's `flex_block_mask` against torch's `create_block_mask`, which evaluates
   the dense tokens x tokens mask: time, CUDA memory at the peak, and that both give the same mask.
7. speed (the issue "Speed on GPUs"): the training step (forward, loss, backward, optimizer step,
   EMA update) of a method built as a run builds it (`compose`, `build_method`, as
   `scripts/bench_compile.py` does), bf16 autocast, on one random batch: DINO ViT-S/16 (`recipe=imagenet`:
   packed 2 x 224 + 10 x 96 px crops, 65,536 prototypes), batch 64, eager and with regional compile
   (`compile_method`); SimCLR ResNet-50 (2 x 224 px), batch 128, eager, compiled and eager channels-last
   (`use_channels_last`). The first step of each (for compiled: compilation), then median seconds
   over alternating rounds; images/s, TFLOP/s from `sslrun.models.flops.count_flops` (forward +
   backward, teacher forward included), MFU against the device's dense bf16 peak (`peak_flops`;
   the goal: 40 % for DINO), and how far the compiled losses are from the eager ones (same seeds).
   Then `scripts/bench_loader.py --device cuda --images 192` (its markdown kept) if the budget allows,
   with lightly's per-image pipeline beside sslrun's where lightly imports: lightly is pure Python,
   so a device without it takes this checkout's copy (the device tool's carry of
   `.venv/lib/python3.11/site-packages/lightly`, that folder on PYTHONPATH). Last, where lightly
   imports and the budget allows, SimCLR ResNet-50 end to end at batch 128 for 30 steps:
   `python -m sslrun` against `scripts/bench_peers.py`'s lightly loop (the issue's "lightly-style
   per-image pipeline at equal batch"; goal 1.2x), then sslrun with `data.decode=device`, on a
   generated folder of JPEGs, images/s from each run's summary.json.
8. suite (the issue "Standard evaluation protocols", not in the default): `python -m sslrun.benchmark
   suite=gpu methods=[simclr,dino] seeds=1`, stopped when the budget is spent. It needs
   Fashion-MNIST where conf/data/fashion_mnist.yaml looks (below: how the lent machine gets it).
   Back: the suite's table, its log and its records (one tar).

Legs run in the order `--only` names them (default 1,2,3,6,7,4,5).

On the lent GPU machine (its own torch, no network): of what sslrun imports, only hydra-core,
omegaconf and antlr4 are missing there (checked 2026-12-07 against its package list; wandb and
submitit are imported only when used), and lightly for the lightly rows. All four are pure Python
and import without pydantic or wandb, so this checkout's copies travel as they are: carry
`.venv/lib/python3.11/site-packages/{hydra,omegaconf,antlr4,lightly}` (7 MB) and put that folder on
PYTHONPATH. For leg 8 copy /usr/share/datasets/fashion-mnist into `.data/` (ignored through
`.git/info/exclude`), carry `.data` and link it where conf/data/fashion_mnist.yaml looks:

    mkdir -p /usr/share/datasets && ln -sfn $PWD/.data/fashion-mnist /usr/share/datasets/fashion-mnist
    PYTHONPATH=$PWD/.venv/lib/python3.11/site-packages python3 scripts/gpu_checks.py --out $OUT --only 7,1,4 --budget 450

Nothing here needs a download; only leg 8 needs a data set. `--only 1,3` runs some legs; `--budget`
(seconds) skips the optional parts once it is spent.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

STARTED = time.time()


def say(message: str) -> None:
    print(f"[{time.time() - STARTED:6.1f}s] {message}", flush=True)


def last_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


_RUNNABLE: dict = {}


@contextlib.contextmanager
def recording_errors(row: dict):
    """One measurement: an error (CUDA out of memory included) goes into `row` instead of ending
    the checks, and memory is freed either way."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = "CUDA out of memory: " + str(error).split(".")[0]
    except Exception as error:  # noqa: BLE001 - record and go on
        row["error"] = last_line(error)
        traceback.print_exc()
    finally:
        free_memory()


def runnable_backends(device: torch.device) -> dict:
    """backend -> None when it trains on `device`, else the reason (`bench_multicrop.trainable_backends`,
    tried once per device)."""
    from bench_multicrop import trainable_backends

    if str(device) not in _RUNNABLE:
        _RUNNABLE[str(device)] = trainable_backends(device)
    return _RUNNABLE[str(device)]


# ---------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    import lightning
    import timm

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "lightning": lightning.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired) as error:
            env["driver"] = f"unknown: {last_line(error)}"
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except Exception as error:  # noqa: BLE001
        env["xformers"] = f"not importable: {last_line(error)}"
    env["backends"] = {name: reason or "ok" for name, reason in runnable_backends(device).items()}
    return env


# ---------------------------------------------------------------------------------------- leg 1
def _vit(attention: str, smoke: bool, device, depth=None, drop_path_rate=0.0):
    import timm

    from sslrun.models.vit import enable_packing

    torch.manual_seed(0)
    if smoke:
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=depth or 2,
                                dynamic_img_size=True, drop_path_rate=drop_path_rate)
    else:
        vit = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True,
                                drop_path_rate=drop_path_rate, **({"depth": depth} if depth else {}))
    return enable_packing(vit, attention).to(device)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _worst(got: dict, expected: dict):
    errors = {name: _relative_error(got[name], expected[name]) for name in expected}
    name = max(errors, key=errors.get)
    return errors[name], name


def leg_equivalence(device, smoke: bool, budget) -> dict:
    from sslrun.models.vit import packed_forward

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sizes = [32, 32, 12, 12, 16] if smoke else [224, 224, 96, 96, 96, 96, 112]
    batch = 2 if smoke else 4
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]
    dtypes = {"fp32": None, "bf16": torch.bfloat16}

    def autocast(dtype):
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def run(vit, forward, dtype):
        vit.zero_grad(set_to_none=True)
        with autocast(dtype):
            outputs = forward(vit)
        weights = torch.Generator().manual_seed(2)
        loss = sum((o.float() * torch.randn(o.shape, generator=weights).to(device)).sum() for o in outputs)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in vit.named_parameters() if p.grad is not None}
        return [o.detach().float() for o in outputs], grads

    def per_crop(vit):
        return [vit.forward_features(c) for c in crops]

    def packed(vit):
        return packed_forward(vit, crops)

    reference_vit = _vit("sdpa", smoke, device).eval()
    reference = {name: run(reference_vit, per_crop, dtype) for name, dtype in dtypes.items()}
    del reference_vit
    timm_bf16 = {"output": max(_relative_error(a, b) for a, b in zip(reference["bf16"][0], reference["fp32"][0])),
                 "gradient": _worst(reference["bf16"][1], reference["fp32"][1])[0]}
    say(f"equivalence: timm's own bf16 vs fp32: {timm_bf16}")
    rows = []
    for backend, reason in runnable_backends(device).items():
        if reason is not None:
            rows.append({"backend": backend, "skipped": reason})
            say(f"equivalence: {backend} skipped: {reason}")
            continue
        torch._dynamo.reset()
        vit = _vit(backend, smoke, device).eval()
        for dtype_name, dtype in dtypes.items():
            row = {"backend": backend, "dtype": dtype_name}
            with recording_errors(row):
                outputs, grads = run(vit, packed, dtype)
                ref_out, ref_grads = reference[dtype_name]
                assert [o.shape for o in outputs] == [r.shape for r in ref_out]
                assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)
                row["output_error"] = max(_relative_error(a, b) for a, b in zip(outputs, ref_out))
                row["gradient_error"], row["worst_gradient"] = _worst(grads, ref_grads)
                if dtype_name == "fp32":
                    row["ok"] = row["output_error"] <= 1e-4 and row["gradient_error"] <= 1e-4
                else:
                    fp32_out, fp32_grads = reference["fp32"]
                    row["output_error_vs_fp32"] = max(_relative_error(a, b) for a, b in zip(outputs, fp32_out))
                    row["gradient_error_vs_fp32"] = _worst(grads, fp32_grads)[0]
                    row["timm_bf16_output_error_vs_fp32"] = timm_bf16["output"]
                    row["timm_bf16_gradient_error_vs_fp32"] = timm_bf16["gradient"]
                    row["ok"] = (row["output_error_vs_fp32"] <= 2 * timm_bf16["output"] + 1e-3
                                 and row["gradient_error_vs_fp32"] <= 2 * timm_bf16["gradient"] + 1e-3)
            rows.append(row)
            say(f"equivalence: {row}")
        del vit
        free_memory()
    return {"crops": f"{' + '.join(str(s) for s in sizes)} px, batch {batch}",
            "model": "vit_tiny (smoke)" if smoke else "vit_small_patch16_224", "rows": rows}


# ---------------------------------------------------------------------------------------- leg 2
def leg_multicrop(device, smoke: bool, budget, batch: int, steps: int) -> dict:
    from bench_multicrop import one_configuration

    backbone = "vit_tiny" if smoke else "vit_small"
    rows = []
    for backend, reason in runnable_backends(device).items():
        if reason is not None:
            rows.append({"backend": backend, "skipped": reason})
            continue
        for packed in ("true", "false"):
            if budget.left() < 0:
                rows.append({"backend": backend, "packed": packed, "skipped": "time budget spent"})
                continue
            torch._dynamo.reset()
            free_memory()
            row = {"backend": backend, "packed": packed}
            args = argparse.Namespace(backbone=backbone, batch=batch, steps=steps, attention=backend, packed=packed)
            with recording_errors(row):
                row.update(one_configuration(args))
            if device.type != "cuda":
                row["peak_mb"] = float("nan")  # one process for all: its resident-set peak says nothing here
            rows.append(row)
            say(f"multicrop: {row}")
    return {"backbone": backbone, "batch": batch, "steps": steps,
            "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "rows": rows}


# ---------------------------------------------------------------------------------------- leg 3
def leg_checkpointing(device, smoke: bool, budget, batch: int, attention: str) -> dict:
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from sslrun.distributed.fsdp import checkpoint_activations
    from sslrun.models.vit import packed_forward

    cuda = device.type == "cuda"
    big, small = (32, 12) if smoke else (224, 96)
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(batch, 3, big, big, generator=g).to(device)]
    multi = [torch.randn(batch, 3, s, s, generator=g).to(device) for s in [big] * 2 + [small] * 10]
    cases = [("plain 224 px", plain, "forward_features"), ("packed DINO student, 2 x 224 + 10 x 96 px", multi, "packed")]
    modes = [("none", False, True), ("checkpoint_activations", True, True),
             ("checkpoint_activations, early_stop=False", True, False)]
    rows = []
    for label, crops, path in cases:
        for mode, checkpointed, early_stop in modes:
            torch._dynamo.reset()
            free_memory()
            row = {"input": label, "checkpointing": mode}
            with recording_errors(row):
                vit = _vit(attention, smoke, device).train()
                if checkpointed:
                    checkpoint_activations(vit)

                def step():
                    with set_checkpoint_early_stop(early_stop), \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        outputs = [vit.forward_features(crops[0])] if path == "forward_features" \
                            else packed_forward(vit, crops)
                        loss = sum(o.float().square().mean() for o in outputs)
                        loss.backward()
                    vit.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()

                step()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                row["step_ms"] = 1000 * statistics.median(times)
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                    row["peak_mib"] = peak / 2**20
                    row["above_weights_and_inputs_mib"] = (peak - before) / 2**20
                vit = None
            rows.append(row)
            say(f"checkpointing: {row}")
    return {"model": "vit_tiny (smoke)" if smoke else "vit_small_patch16_224", "batch": batch,
            "attention": attention, "dtype": "bf16 autocast" if cuda else "fp32", "rows": rows}


# ---------------------------------------------------------------------------------------- leg 4
def _image(args) -> None:
    import numpy as np
    from PIL import Image

    path, seed, size = args
    rng = np.random.default_rng(seed)
    coarse = (rng.random((8, 8, 3)) * 255).astype(np.uint8)  # smooth random blobs, small PNGs
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    noise = rng.integers(-8, 9, (size, size, 3))
    Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).save(path)


def make_image_folder(root: Path, train_per_class: int, val_per_class: int, classes: int, size: int) -> None:
    from multiprocessing import Pool

    jobs = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{i}.png", (split == "val") * 10**7 + c * 10**5 + i, size) for i in range(count)]
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_image, jobs, chunksize=16)


def leg_fsdp(device, smoke: bool, budget, out: Path, work: Path) -> dict:
    cuda = device.type == "cuda"
    data = work / "images"
    if data.exists():
        shutil.rmtree(data)
    start = time.time()
    batch = 8 if smoke else 64
    make_image_folder(data, train_per_class=4 if smoke else 400, val_per_class=4 if smoke else 32,
                      classes=4, size=64 if smoke else 256)
    say(f"fsdp: image folder made in {time.time() - start:.1f}s")
    steps = 2 if smoke else 20
    common = ["recipe=none", "data=imagefolder", f"data.root={data}", f"data.batch_size={batch}",
              "trainer=fsdp", "trainer.devices=1", f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
              "trainer.fsdp.param_dtype=bf16", f"trainer.max_steps={steps}", "trainer.progress_bar=false",
              "trainer.log_every_n_steps=5", "eval.pictures=2", "resume=null"]
    dino = ["method=dino"]
    # CLIP on the same folder: a labelled image folder is captioned from its class names, one of
    # `method.prompts` drawn per image (data.ClassCaptions); ViT-B/16 image tower, the paper's text tower.
    clip = ["method=clip"]
    if smoke:
        common += ["backbone=vit_tiny_p4", "data.image_size=32", "data.num_workers=0"]
        dino += ["augmentation.views.2.size=16", "method.head.out_dim=1024"]
        clip += ["method.embed_dim=128", "method.text.context_length=16", "method.text.width=128",
                 "method.text.layers=2", "method.text.heads=4"]
    runs = [("plain", dino)]
    if not smoke:
        runs.append(("activation_checkpointing", dino + ["trainer.fsdp.activation_checkpointing=true"]))
    runs.append(("clip", clip))
    rows = []
    for name, extra in runs:
        if name != "plain" and budget.left() < 100:
            rows.append({"run": name, "skipped": "time budget spent"})
            continue
        run_dir = work / f"run-{name}"
        command = [sys.executable, "-m", "sslrun", *extra, *common, f"hydra.run.dir={run_dir}"]
        row = {"run": name, "command": "python -m sslrun " + " ".join(a for a in command[3:] if "hydra.run.dir" not in a
                                                                      and "data.root" not in a)}
        say(f"fsdp: {name}: {' '.join(command[1:])}")
        start = time.time()
        log_path = out / f"fsdp_{name}.log"
        with open(log_path, "w") as log:
            try:
                process = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         timeout=max(60, budget.left() + 60),
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
                row["returncode"] = process.returncode
            except subprocess.TimeoutExpired:
                row["returncode"] = "timeout"
        row["wall_s"] = time.time() - start
        summary = run_dir / "summary.json"
        if summary.is_file():
            data_summary = json.loads(summary.read_text())
            shutil.copy(summary, out / f"fsdp_{name}_summary.json")
            for key in ("train_loss", "images_per_sec", "peak_memory_mb", "peak_memory_kind", "wall_time_sec",
                        "global_step", "knn_top1", "knn_top1_random_init", "zero_shot_top1",
                        "zero_shot_top1_random_init", "world_size"):
                row[key] = data_summary.get(key)
            row["summary_written"] = True
            metrics = run_dir / "csv" / "metrics.csv"
            if metrics.is_file():
                row["loss_curve"] = _loss_curve(metrics)
        else:
            row["summary_written"] = False
            row["log_tail"] = log_path.read_text()[-3000:]
        attention = [line.strip() for line in log_path.read_text().splitlines() if "attention backend" in line]
        row["attention_log"] = attention[:2]
        rows.append(row)
        say(f"fsdp: {name}: {({k: v for k, v in row.items() if k != 'log_tail'})}")
    return {"batch": batch, "steps": steps, "rows": rows}


def _loss_curve(metrics: Path) -> list:
    import csv

    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in ("train/loss", "train/loss_step", "loss") if rows and k in rows[0]), None)
    if key is None:
        return []
    return [(int(r["step"]), round(float(r[key]), 4)) for r in rows if r.get(key)]


# ---------------------------------------------------------------------------------------- leg 5
class _DynamoLog:
    """Collects torch._dynamo's warnings about hitting its recompile limit (after which a compiled
    function runs eagerly: for flex_attention, an unfused kernel that materialises the scores)."""

    def __enter__(self):
        import logging

        self.hits = []
        handler = logging.Handler()
        handler.emit = lambda record: self.hits.append(record.getMessage()[:200]) \
            if "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage() else None
        self.handler, self.logger = handler, logging.getLogger("torch._dynamo")
        self.logger.addHandler(handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def leg_flex_drop_path(device, smoke: bool, budget, batch: int, steps: int) -> dict:
    """flex under efficient stochastic depth: each block attends over a random subset of crops, so
    the packed length changes from call to call. sslrun marks such packings `varying` and runs them
    through flex compiled for dynamic shapes (on CUDA); with shape-specialised compilation each new
    length would recompile, and after torch._dynamo's limit (8) flex would run unfused. Measured:
    graphs compiled, recompile-limit hits, step times, against sdpa, and exactness on new lengths."""
    import torch._dynamo.utils as dynamo_utils

    from sslrun.models import attention as attention_module
    from sslrun.models.attention import Packing, sdpa_attention
    from sslrun.models.vit import packed_forward

    cuda = device.type == "cuda"
    big, small = (32, 12) if smoke else (224, 96)
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, s, s, generator=g).to(device) for s in [big] * 2 + [small] * 10]
    rows = []
    for backend in ("sdpa", "flex"):
        if runnable_backends(device)[backend] is not None:
            rows.append({"backend": backend, "skipped": runnable_backends(device)[backend]})
            continue
        if budget.left() < 40:
            rows.append({"backend": backend, "skipped": "time budget spent"})
            continue
        torch._dynamo.reset()
        attention_module._compiled_flex.clear()
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
        row = {"backend": backend, "drop_path_rate": 0.1}
        with recording_errors(row):
            with _DynamoLog() as dynamo_log:
                vit = _vit(backend, smoke, device, drop_path_rate=0.1).train()
                times = []
                for i in range(steps):
                    if budget.left() < 10:
                        break
                    start = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        loss = sum(o.float().square().mean() for o in packed_forward(vit, crops))
                    loss.backward()
                    vit.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                    say(f"flex/drop path: {backend} step {i}: {times[-1]:.2f}s")
            row.update(steps=len(times), first_step_s=times[0] if times else None,
                       later_steps_ms=1000 * statistics.median(times[2:]) if len(times) > 2 else None,
                       graphs_compiled=dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before,
                       recompile_limit_hits=dynamo_log.hits[:3],
                       flex_kernels=[str(k) for k in attention_module._compiled_flex])
            if cuda:
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if backend == "flex":  # the dynamic kernel on lengths it has not seen, against sdpa
                worst = 0.0
                for lengths in [(197, 197, 37, 37, 37), (197, 37, 37, 37, 50), (37,) * 9]:
                    packing = Packing(lengths, varying=True)
                    q, k, v = (torch.randn(1, 6, packing.total, 64, device=device) for _ in range(3))
                    with torch.no_grad():
                        worst = max(worst, _relative_error(attention_module.flex_attention(q, k, v, packing),
                                                           sdpa_attention(q, k, v, packing)))
                row["error_vs_sdpa_new_lengths"] = worst
                row["graphs_compiled_total"] = dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before
            vit = None
        rows.append(row)
        say(f"flex/drop path: {row}")
    return {"batch": batch, "crops": "2 x 224 + 10 x 96 px" if not smoke else "smoke", "rows": rows}


# ---------------------------------------------------------------------------------------- leg 6
def leg_block_mask(device, smoke: bool, budget, batch: int) -> dict:
    """Building flex's block mask for one packed DINO student batch: sslrun's `flex_block_mask`
    (per pair of 128-token blocks) against torch's `create_block_mask` (evaluates the dense
    tokens x tokens mask): time and the CUDA memory it takes at its peak."""
    from torch.nn.attention.flex_attention import create_block_mask

    from sslrun.models.attention import Packing, flex_block_mask

    cuda = device.type == "cuda"
    packing = Packing(((50,) * 2 + (10,) * 10) * batch if smoke else ((197,) * 2 + (37,) * 10) * batch)
    ids = packing.segment_ids(device)
    builders = {"sslrun flex_block_mask": lambda: flex_block_mask(packing, device),
                "torch create_block_mask": lambda: create_block_mask(lambda b, h, q, k: ids[q] == ids[k], None, None,
                                                                     packing.total, packing.total, device=device)}
    rows, masks = [], {}
    for name, build in builders.items():
        free_memory()
        row = {"builder": name, "tokens": packing.total}
        with recording_errors(row):
            build()  # warm-up (CUDA context, kernels)
            free_memory()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            masks[name] = build()
            if cuda:
                torch.cuda.synchronize()
                row["peak_above_before_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            row["ms"] = 1000 * (time.perf_counter() - start)
        rows.append(row)
        say(f"block mask: {row}")
    if len(masks) == 2:
        a, b = masks.values()
        rows[0]["equal_to_torch"] = all(torch.equal(getattr(a, n), getattr(b, n)) for n in (
            "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices"))
    masks.clear()
    free_memory()
    return {"batch": batch, "rows": rows}


# ---------------------------------------------------------------------------------------- leg 7
def _speed_build(overrides: list, device):
    from sslrun.config import compose
    from sslrun.train import build_method, lr_schedule

    cfg = compose(overrides)
    schedule, steps_per_epoch = lr_schedule(cfg, 60000)
    torch.manual_seed(0)
    method = build_method(cfg, schedule, None, steps_per_epoch).to(device)
    return method, method.configure_optimizers(), cfg


def _speed_method(device, budget, overrides: list, batch: int, variants: dict, warmup: int, rounds: int) -> dict:
    """One method's training step (forward, loss, backward, optimizer step, `after_optimizer_step`:
    the EMA teacher's update), bf16 autocast on CUDA, for each of `variants` (name -> what is done
    to a freshly built copy: nothing, `compile_method`, `use_channels_last`), all from the same seed
    on the same batch: the first step, `warmup` more, then `rounds` rounds of one step each in
    alternation (each round's seed the same for all), median seconds. FLOPs of one step:
    `count_flops` over the eager copy's forward + backward (teacher forward included; the optimizer
    step and EMA are elementwise, not counted)."""
    from sslrun.models.flops import count_flops, peak_flops

    cuda = device.type == "cuda"
    overrides = overrides + [f"data.batch_size={batch}", "trainer.devices=1", f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
                             "trainer.compile.enabled=false", "trainer.channels_last=false"]
    models, result = {}, {"overrides": " ".join(overrides), "batch": batch, "rows": []}
    for name, prepare in variants.items():
        model, optimizer, cfg = _speed_build(overrides, device)
        applied = prepare(model) if prepare is not None else None
        if prepare is not None and not applied:
            result["rows"].append({"variant": name, "skipped": f"{prepare.__name__}: nothing to apply it to"})
            continue
        if applied is not None:
            result.setdefault("applied", {})[name] = f"{prepare.__name__}: {applied}"
        models[name] = (model, optimizer)
    result["backbone"] = cfg.backbone.name
    sizes = [view.size for view in cfg.augmentation.views for _ in range(view.count)]
    result["crops"] = " + ".join(f"{sizes.count(s)} x {s}" for s in dict.fromkeys(sizes)) + " px"
    generator = torch.Generator().manual_seed(0)
    inputs = {"views": [torch.randn(batch, cfg.data.channels, s, s, generator=generator).to(device) for s in sizes]}

    def forward_backward(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model.training_loss(inputs).loss
        loss.backward()
        return loss.detach()

    def step(model, optimizer, seed):
        torch.manual_seed(seed)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = forward_backward(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss.item()

    first, times, losses = {}, {name: [] for name in models}, {name: [] for name in models}
    for name, (model, optimizer) in models.items():
        seconds, loss = step(model, optimizer, 0)
        first[name] = {"first_step_s": seconds, "warmup_s": [], "first_loss": loss}
        for i in range(warmup):
            first[name]["warmup_s"].append(step(model, optimizer, 1 + i)[0])
        say(f"speed: {result['backbone']} {name}: first step {seconds:.2f}s, "
            f"warm-up {[round(t, 3) for t in first[name]['warmup_s']]}")
    for round_ in range(rounds):
        if round_ > 0 and budget.left() < 0:
            result["rounds_cut"] = "time budget spent"
            break
        for name, (model, optimizer) in models.items():
            seconds, loss = step(model, optimizer, 1 + warmup + round_)
            times[name].append(seconds)
            losses[name].append(loss)
    eager = models.get("eager")
    flops = None
    if eager:
        flops = count_flops(lambda: forward_backward(eager[0]), eager[0], device)
        eager[0].zero_grad(set_to_none=True)
    peak = peak_flops(torch.cuda.get_device_name(device) if cuda else None, "bf16")
    result.update(flops_per_step=flops, peak_tflops=peak / 1e12 if peak else None, rounds=len(times[next(iter(models))]))

    def relative(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    for name in models:
        median = statistics.median(times[name]) if times[name] else None
        row = {"variant": name, **first[name], "step_s": median, "losses": losses[name]}
        if median:
            row["images_per_s"] = batch / median
            row["tflops_per_s"] = flops / median / 1e12 if flops else None
            row["mfu"] = flops / median / peak if flops and peak else None
        if eager and name != "eager":
            row["loss_rel_diff_first_step"] = relative(first[name]["first_loss"], first["eager"]["first_loss"])
            row["loss_rel_diff_max"] = max([row["loss_rel_diff_first_step"]] + [
                relative(a, b) for a, b in zip(losses[name], losses["eager"])])
            if times[name] and times["eager"]:
                row["speedup_vs_eager"] = statistics.median(times["eager"]) / median
        result["rows"].append(row)
        say(f"speed: {result['backbone']} {({k: v for k, v in row.items() if k != 'losses'})}")
    models.clear()
    return result


def _jpeg(job) -> None:
    import numpy as np
    from bench_loader import photo

    path, seed = job
    rng = np.random.default_rng(seed)
    photo(int(rng.integers(300, 501)), int(rng.integers(300, 501)), rng).save(path, quality=90)


def _against_lightly(device, smoke: bool, budget, work: Path) -> dict:
    """SimCLR ResNet-50 end to end against a lightly-style per-image pipeline at equal batch:
    `python -m sslrun` and `scripts/bench_peers.py`'s lightly loop (lightly's transforms, head and
    loss in a plain loop, PIL decoding in the workers) from one composed config: bf16 autocast,
    8 loader workers each, on a folder of bench_loader's photo-like JPEGs (300-500 px) holding one
    epoch of steps, so neither side's timing crosses an epoch. sslrun, then lightly, then sslrun
    with data.decode=device where the budget allows; images/s from each run's summary.json (the
    same measure on both sides: steps 6 on, data loading included)."""
    from multiprocessing import Pool

    import bench_peers

    try:
        import lightly.loss  # noqa: F401 - what the lightly loop needs
    except Exception as error:  # noqa: BLE001 - an extension that fails to load raises others too
        return {"skipped": f"lightly does not import: {last_line(error)}"}
    batch, steps, workers = (4, 8, 0) if smoke else (128, 30, 8)
    data, root = work / "jpegs", work / "peers"
    for folder in (data, root):
        shutil.rmtree(folder, ignore_errors=True)
    jobs = [(data / "train" / f"class{i % 8}" / f"{i}.jpg", i) for i in range(batch * (steps + 1))]
    for folder in {path.parent for path, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_jpeg, jobs, chunksize=8)
    extra = ["recipe=imagenet", "trainer=single", "trainer.devices=1", f"data.root={data}", f"data.batch_size={batch}",
             f"data.num_workers={workers}", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    extra += ["backbone=resnet18", "data.image_size=32"] if smoke else ["backbone=resnet50", "data.image_size=224"]
    result = {"images": len(jobs), "folder_s": time.time() - start, "batch": batch, "steps": steps,
              "overrides": " ".join(["method=simclr", *bench_peers.COMMON, *(a for a in extra if "data.root" not in a)]),
              "rows": []}
    say(f"speed: against lightly: {len(jobs)} JPEGs in {result['folder_s']:.1f}s; {result['overrides']}")
    for name, side, more in (("sslrun", "sslrun", []), ("lightly", "lightly", []),
                             ("sslrun, data.decode=device", "sslrun", ["data.decode=device"])):
        row = {"run": name}
        if name != "sslrun" and budget.left() < 45:
            row["skipped"] = "time budget spent"
        else:
            start, where = time.time(), root / name.split(",")[0] / ("device" if more else "")
            bench_peers.run_side(side, "simclr", 0, steps, where, [*extra, *more], timeout=max(60, min(240, budget.left())))
            run_dir = where / "simclr" / f"{side}_seed0"
            summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
            row.update({key: summary.get(key) for key in ("status", "global_step", "images_per_sec", "mfu",
                                                           "tflops_per_sec", "wall_time_sec")}, wall_s=time.time() - start)
            if summary.get("status") != "completed":
                row["log_tail"] = (run_dir / "peers.out").read_text()[-3000:]
        result["rows"].append(row)
        say(f"speed: against lightly: {({k: v for k, v in row.items() if k != 'log_tail'})}")
    rates = {row["run"]: row.get("images_per_sec") for row in result["rows"]}
    if rates.get("sslrun") and rates.get("lightly"):
        result["sslrun_over_lightly"] = rates["sslrun"] / rates["lightly"]
    return result


def leg_speed(device, smoke: bool, budget, out: Path, work: Path) -> dict:
    """The issue "Speed on GPUs": DINO ViT-S/16's packed multi-crop step, eager and regionally
    compiled (MFU against the device's dense bf16 peak; goal 40 %); SimCLR ResNet-50's step, eager,
    compiled and channels-last (images/s); `scripts/bench_loader.py` on this device; and SimCLR
    end to end against lightly's per-image pipeline (`_against_lightly`; goal 1.2x)."""
    from sslrun.distributed.compile import compile_method, use_channels_last

    compiled = {"eager": None, "compiled": compile_method}
    warmup, rounds = (1, 2) if smoke else (2, 5)
    result = {"dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}
    dino = ["method=dino", "recipe=imagenet", "data=imagefolder", "data.root=synthetic"]
    dino += (["backbone=vit_tiny_p4", "data.image_size=32", "augmentation.views.2.size=16", "augmentation.views.2.count=2",
              "method.head.out_dim=1024"] if smoke else ["backbone=vit_small", "data.image_size=224"])
    simclr = ["method=simclr", "recipe=imagenet", "data=imagefolder", "data.root=synthetic"]
    simclr += ["backbone=resnet18", "data.image_size=32"] if smoke else ["backbone=resnet50", "data.image_size=224"]
    parts = [("dino", 40, lambda: _speed_method(device, budget, dino, 2 if smoke else 64, compiled, warmup, rounds)),
             ("simclr", 60, lambda: _speed_method(device, budget, simclr, 4 if smoke else 128,
                                                  {**compiled, "channels-last": use_channels_last}, warmup, rounds))]
    for name, needed, measure in parts:
        part = {}
        if name != "dino" and budget.left() < needed:
            part["skipped"] = "time budget spent"
        else:
            torch._dynamo.reset()
            with recording_errors(part):
                part.update(measure())
        result[name] = part
    loader = {}
    if budget.left() < 90:
        loader["skipped"] = "time budget spent"
    else:
        with recording_errors(loader):
            markdown_path, log_path = out / "bench_loader.md", out / "bench_loader.log"
            markdown_path.unlink(missing_ok=True)
            options = ["--images", "16", "--batch", "4", "--step-batch", "2", "--steps", "1"] if smoke else \
                ["--images", "192", "--batch", "32", "--steps", "3"]
            command = [sys.executable, str(REPO / "scripts" / "bench_loader.py"), "--device", device.type, *options,
                       "--output", str(markdown_path)]
            loader["command"] = "python scripts/bench_loader.py " + " ".join(command[2:-2])
            python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            say(f"speed: {loader['command']}")
            start = time.time()
            with open(log_path, "w") as log:
                try:
                    process = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                             timeout=max(60, min(180, budget.left())),
                                             env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path})
                    loader["returncode"] = process.returncode
                except subprocess.TimeoutExpired:
                    loader["returncode"] = "timeout"
            loader["wall_s"] = time.time() - start
            if markdown_path.is_file():
                loader["markdown"] = markdown_path.read_text().strip()
            else:
                loader["log_tail"] = log_path.read_text()[-3000:]
            say(f"speed: bench_loader: rc {loader['returncode']}, {loader['wall_s']:.0f}s")
    result["bench_loader"] = loader
    peers = {}
    if budget.left() < 120:
        peers["skipped"] = "time budget spent"
    else:
        with recording_errors(peers):
            peers.update(_against_lightly(device, smoke, budget, work))
    result["against_lightly"] = peers
    return result


# ---------------------------------------------------------------------------------------- leg 8
SUITE_METHODS = "[simclr,dino]"  # the issue "Standard evaluation protocols": the gpu suite for these two


def leg_suite(device, smoke: bool, budget, out: Path, work: Path) -> dict:
    """`python -m sslrun.benchmark suite=gpu methods=[simclr,dino] seeds=1`: training at the gpu
    suite's budget, then the offline kNN and linear protocols, on this GPU, on the quick recipes'
    data (Fashion-MNIST, which must be where conf/data/fashion_mnist.yaml looks: a device without it
    takes this machine's copy, carried and linked there). Stopped (SIGTERM, which the benchmark
    passes on to its training process) when the budget is spent. Back: the suite's table
    (results_gpu.md), its log and the runs' records (summary.json, benchmark.json, eval/*.json) in
    one tar, which `python -m sslrun.benchmark suite=gpu methods=[simclr,dino] seeds=1
    records=docs/results/gpu mode=table` turns into docs/results.md's gpu section. The smoke:
    two steps per method on mnist5k, on CPU."""
    import tarfile

    from sslrun.config import compose

    if not smoke:
        data = Path(compose(["data=fashion_mnist"]).data.root)
        if not (data / "train-images-idx3-ubyte.gz").is_file():
            return {"skipped": f"no Fashion-MNIST at {data}: carry /usr/share/datasets/fashion-mnist and link it there"}
    root, records = work / "suite", work / "records"
    for folder in (root, records):
        shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "sslrun.benchmark", "suite=gpu", f"methods={SUITE_METHODS}", "seeds=1",
               f"root={root}", f"records={records}", f"out={out / 'results_gpu.md'}"]
    if smoke:
        command += ["suite.train=['trainer.progress_bar=false','trainer.accelerator=cpu','trainer.max_steps=2',"
                    "'data=mnist5k','data.num_workers=0','eval.every_n_epochs=0']", "suite.methods.dino=[]"]
    result = {"command": "python -m sslrun.benchmark " + " ".join(a for a in command[3:] if not a.startswith(
        ("root=", "records=", "out=")))}
    say(f"suite: {result['command']}")
    start = time.time()
    with open(out / "gpu_suite.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            result["returncode"] = process.wait(timeout=max(60, budget.left()))
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                result["returncode"] = f"stopped at the budget ({process.wait(timeout=60)})"
            except subprocess.TimeoutExpired:
                process.kill()
                result["returncode"] = f"killed at the budget ({process.wait()})"
    result["wall_s"] = time.time() - start
    records.mkdir(parents=True, exist_ok=True)  # empty where no run finished
    with tarfile.open(out / "gpu_suite_records.tar", "w") as tar:
        tar.add(records, arcname="gpu")
    table = out / "results_gpu.md"
    result["table"] = table.read_text().strip() if table.is_file() else None
    result["records"] = sorted(str(p.relative_to(records)) for p in records.rglob("*.json"))
    say(f"suite: rc {result['returncode']}, {result['wall_s']:.0f}s, records: {result['records']}")
    return result


# ---------------------------------------------------------------------------------------- report
def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.2e}"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU checks ({results.get('date', '')})", "",
             f"- Device: {env.get('gpu', env.get('device'))}; driver {env.get('driver')}; torch {env.get('torch')}; "
             f"CUDA {env.get('cuda')}; "
             f"Python {env.get('python')}; timm {env.get('timm')}; lightning {env.get('lightning')}; "
             f"xformers {env.get('xformers')}",
             f"- Command: `{results.get('command')}`",
             "- Backends: " + ", ".join(f"{k}: {v}" for k, v in env.get("backends", {}).items()), ""]
    eq = results.get("equivalence")
    if eq:
        lines += [f"## 1. Packed multi-crop forward vs timm per-crop forward ({eq['model']}, {eq['crops']})", "",
                  "| backend | dtype | output error | gradient error (worst tensor) | bf16: output / gradient error vs "
                  "timm fp32 (timm's own bf16) | ok |", "| --- | --- | --- | --- | --- | --- |"]
        for r in eq["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['backend']} | | skipped: {r['skipped']} | | | |")
            elif "error" in r:
                lines.append(f"| {r['backend']} | {r['dtype']} | failed: {r['error']} | | | no |")
            else:
                vs = ""
                if r["dtype"] == "bf16":
                    vs = (f"{_fmt(r['output_error_vs_fp32'])} / {_fmt(r['gradient_error_vs_fp32'])} "
                          f"({_fmt(r['timm_bf16_output_error_vs_fp32'])} / {_fmt(r['timm_bf16_gradient_error_vs_fp32'])})")
                lines.append(f"| {r['backend']} | {r['dtype']} | {_fmt(r['output_error'])} | "
                             f"{_fmt(r['gradient_error'])} (`{r['worst_gradient']}`) | {vs} | {'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    mc = results.get("multicrop")
    if mc:
        lines += [f"## 2. DINO multi-crop step, packed vs unpacked ({mc['backbone']}, batch {mc['batch']}, "
                  f"{mc['dtype']}, median of {mc['steps']} steps)", "",
                  "| attention | packed ms/step | unpacked ms/step | packed speed-up | packed peak MiB | unpacked peak MiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        by_backend = {}
        for r in mc["rows"]:
            by_backend.setdefault(r["backend"], {})[r.get("packed", "-")] = r
        for backend, got in by_backend.items():
            if "-" in got:
                lines.append(f"| {backend} | skipped: {got['-']['skipped']} | | | | |")
                continue
            p, u = got.get("true", {}), got.get("false", {})

            def cell(r, key):
                if "step_ms" in r:
                    return f"{r[key]:.0f}"
                return r.get("error") or r.get("skipped") or ""

            speed = f"{u['step_ms'] / p['step_ms']:.2f}x" if "step_ms" in p and "step_ms" in u else ""
            lines.append(f"| {backend} | {cell(p, 'step_ms')} | {cell(u, 'step_ms')} | {speed} | "
                         f"{cell(p, 'peak_mb')} | {cell(u, 'peak_mb')} |")
        lines.append("")
    ck = results.get("checkpointing")
    if ck:
        lines += [f"## 3. Activation checkpointing ({ck['model']}, batch {ck['batch']}, {ck['dtype']}, "
                  f"attention {ck['attention']}, forward + backward)", "",
                  "| input | checkpointing | ms/step | CUDA max allocated MiB | above weights + inputs MiB |",
                  "| --- | --- | --- | --- | --- |"]
        for r in ck["rows"]:
            if "error" in r:
                lines.append(f"| {r['input']} | {r['checkpointing']} | failed: {r['error']} | | |")
            else:
                lines.append(f"| {r['input']} | {r['checkpointing']} | {r['step_ms']:.0f} | "
                             f"{_fmt(r.get('peak_mib'), 0)} | {_fmt(r.get('above_weights_and_inputs_mib'), 0)} |")
        lines.append("")
    fs = results.get("fsdp")
    if fs:
        lines += [f"## 4. FSDP through the CLI ({fs['steps']} steps, batch {fs['batch']})", "",
                  "| run | summary.json | train_loss | images/s | peak memory MiB | wall s | kNN top-1 (random init) | "
                  "zero-shot top-1 (random init) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fs["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['run']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(f"| {r['run']} | {'yes' if r['summary_written'] else 'NO (rc ' + str(r['returncode']) + ')'} | "
                         f"{_fmt(r.get('train_loss'))} | {_fmt(r.get('images_per_sec'), 1)} | "
                         f"{_fmt(r.get('peak_memory_mb'), 0)} | {_fmt(r.get('wall_s'), 0)} | "
                         f"{_fmt(r.get('knn_top1'))} ({_fmt(r.get('knn_top1_random_init'))}) | "
                         + (f"{_fmt(r['zero_shot_top1'])} ({_fmt(r.get('zero_shot_top1_random_init'))})"
                            if r.get("zero_shot_top1") is not None else "") + " |")
        for r in fs["rows"]:
            if "command" in r:
                lines.append(f"\n- {r['run']}: `{r['command']}`; attention: {r.get('attention_log')}; "
                             f"loss curve: {r.get('loss_curve')}")
        lines.append("")
    fd = results.get("flex_drop_path")
    if fd:
        lines += [f"## 5. flex_attention under stochastic depth (ViT-S/16, drop path 0.1, batch {fd['batch']}, "
                  f"{fd['crops']}, forward + backward, bf16 autocast)", "",
                  "| backend | steps | first step s | later ms/step | graphs compiled | recompile-limit hits | "
                  "error vs sdpa on new lengths | peak MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fd["rows"]:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r['backend']} | {r.get('skipped') or 'failed: ' + r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['backend']} | {r['steps']} | {_fmt(r['first_step_s'], 1)} | "
                         f"{_fmt(r['later_steps_ms'], 0)} | {r.get('graphs_compiled_total', r['graphs_compiled'])} | "
                         f"{len(r['recompile_limit_hits'])} | {_fmt(r.get('error_vs_sdpa_new_lengths'))} | "
                         f"{_fmt(r.get('peak_mib'), 0)} |")
        lines.append("")
    bm = results.get("block_mask")
    if bm:
        lines += [f"## 6. Building flex's block mask for one packed DINO student batch ({bm['batch']} images x 12 crops)",
                  "", "| builder | tokens | ms | CUDA memory at its peak MiB | equal to torch's |",
                  "| --- | --- | --- | --- | --- |"]
        for r in bm["rows"]:
            if "error" in r:
                lines.append(f"| {r['builder']} | {r['tokens']} | failed: {r['error']} | | |")
                continue
            equal = {True: "yes", False: "NO"}.get(r.get("equal_to_torch"), "")
            lines.append(f"| {r['builder']} | {r['tokens']} | {_fmt(r['ms'], 1)} | "
                         f"{_fmt(r.get('peak_above_before_mib'), 0)} | {equal} |")
        lines.append("")
    sp = results.get("speed")
    if sp:
        lines += [f"## 7. Speed: training step, eager vs regional compile ({sp['dtype']}, one random batch)", "",
                  "| method | variant | first step s | step s | images/s | TFLOP/s | MFU | speed-up vs eager | "
                  "loss rel. diff vs eager (first step / max) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        notes = []
        for method in ("dino", "simclr"):
            part = sp.get(method, {})
            if "skipped" in part or ("error" in part and not part.get("rows")):
                lines.append(f"| {method} | {part.get('skipped') or 'failed: ' + part.get('error', '')} | | | | | | | |")
                continue
            label = f"{method} ({part['backbone']}, batch {part['batch']}, {part['crops']})"
            for r in part["rows"]:
                if "skipped" in r:
                    lines.append(f"| {label} | {r['variant']}: skipped: {r['skipped']} | | | | | | | |")
                    continue
                diff = f"{_fmt(r['loss_rel_diff_first_step'])} / {_fmt(r['loss_rel_diff_max'])}" \
                    if "loss_rel_diff_max" in r else ""
                mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
                speed = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
                lines.append(f"| {label} | {r['variant']} | {_fmt(r['first_step_s'], 2)} | {_fmt(r.get('step_s'))} | "
                             f"{_fmt(r.get('images_per_s'), 1)} | {_fmt(r.get('tflops_per_s'), 1)} | {mfu} | {speed} | "
                             f"{diff} |")
            flops = part.get("flops_per_step")
            notes.append(f"- {method}: {_fmt(flops / 1e12 if flops else None)} TFLOP per step (forward + backward); "
                         f"median of {part.get('rounds')} rounds; dense bf16 peak: "
                         f"{_fmt(part.get('peak_tflops'), 1) + ' TFLOP/s' if part.get('peak_tflops') else 'unknown (no MFU)'}; "
                         f"{part.get('applied', {})}; `{part['overrides']}`"
                         + (f"; failed after: {part['error']}" if "error" in part else ""))
        lines += [""] + notes + [""]
        loader = sp.get("bench_loader", {})
        if "markdown" in loader:
            lines += ["### " + loader["markdown"].lstrip("#").strip(), ""]
        elif loader:
            lines += [f"- bench_loader: {loader.get('skipped') or loader.get('error') or 'rc ' + str(loader.get('returncode'))}",
                      ""]
        peers = sp.get("against_lightly", {})
        if peers.get("rows"):
            lines += [f"### SimCLR end to end against lightly's per-image pipeline (batch {peers['batch']}, "
                      f"{peers['steps']} steps, {peers['images']} JPEGs)", "",
                      "| run | status | images/s | TFLOP/s | MFU | run wall s |", "| --- | --- | --- | --- | --- | --- |"]
            for r in peers["rows"]:
                mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
                lines.append(f"| {r['run']} | {r.get('skipped') or r.get('status') or 'failed'} | "
                             f"{_fmt(r.get('images_per_sec'), 1)} | {_fmt(r.get('tflops_per_sec'), 1)} | {mfu} | "
                             f"{_fmt(r.get('wall_s'), 0)} |")
            lines += ["", f"- sslrun / lightly: {_fmt(peers.get('sslrun_over_lightly'), 2)} (goal 1.2); "
                          f"`{peers['overrides']}`", ""]
        elif peers:
            lines += [f"- against lightly: {peers.get('skipped') or peers.get('error')}", ""]
    su = results.get("suite")
    if su:
        lines += ["## 8. The gpu suite (sslrun.benchmark)", "", f"- `{su.get('command', '')}`: "
                  f"{su.get('skipped') or 'rc ' + str(su.get('returncode'))}, {_fmt(su.get('wall_s'), 0)} s", ""]
        if su.get("table"):
            lines += [su["table"], ""]
    if results.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
    lines.append(f"Total time: {results.get('total_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


class Budget:
    def __init__(self, seconds: float):
        self.end = STARTED + seconds

    def left(self) -> float:
        return self.end - time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_checks.json, gpu_checks.md and run logs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to check the script runs")
    parser.add_argument("--only", default="1,2,3,6,7,4,5", help="legs to run, e.g. 1,3")
    parser.add_argument("--budget", type=float, default=330, help="seconds after which optional parts are skipped")
    parser.add_argument("--bench-batch", type=int, default=16)
    parser.add_argument("--bench-steps", type=int, default=5)
    parser.add_argument("--ckpt-batch", type=int, default=64)
    parser.add_argument("--ckpt-attention", default="sdpa")
    parser.add_argument("--flex-batch", type=int, default=8)
    parser.add_argument("--work", default="/tmp/gpu_checks", help="scratch folder (generated images, run dirs)")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_checks: no CUDA device here; use --cpu-smoke to check the script on CPU")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        args.bench_batch, args.bench_steps, args.ckpt_batch, args.flex_batch = 2, 1, 2, 2
    legs = [int(x) for x in args.only.split(",")]
    budget = Budget(args.budget)
    import datetime

    results = {"date": datetime.date.today().isoformat(), "command": "python scripts/gpu_checks.py " + " ".join(sys.argv[1:]),
               "errors": []}

    def save():
        results["total_s"] = time.time() - STARTED
        (out / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        try:
            report = markdown(results)
        except Exception as error:  # noqa: BLE001 - a report bug must not cost the legs still to run
            traceback.print_exc()
            report = f"# GPU checks\n\nThe report failed ({last_line(error)}); gpu_checks.json holds every result.\n"
        (out / "gpu_checks.md").write_text(report)

    results["environment"] = environment(device)
    say(f"environment: {results['environment']}")
    save()
    plan = [(1, "equivalence", lambda: leg_equivalence(device, smoke, budget)),
            (2, "multicrop", lambda: leg_multicrop(device, smoke, budget, args.bench_batch, args.bench_steps)),
            (3, "checkpointing", lambda: leg_checkpointing(device, smoke, budget, args.ckpt_batch, args.ckpt_attention)),
            (4, "fsdp", lambda: leg_fsdp(device, smoke, budget, out, work)),
            (5, "flex_drop_path", lambda: leg_flex_drop_path(device, smoke, budget, args.flex_batch, 6)),
            (6, "block_mask", lambda: leg_block_mask(device, smoke, budget, args.ckpt_batch)),
            (7, "speed", lambda: leg_speed(device, smoke, budget, out, work)),
            (8, "suite", lambda: leg_suite(device, smoke, budget, out, work))]
    plan = sorted((p for p in plan if p[0] in legs), key=lambda p: legs.index(p[0]))
    for number, name, leg in plan:
        say(f"leg {number}: {name}")
        try:
            results[name] = leg()
        except Exception as error:  # noqa: BLE001 - keep the other legs
            traceback.print_exc()
            results["errors"].append(f"leg {number} ({name}): {last_line(error)}")
        free_memory()
        save()
    import torch._dynamo.utils as dynamo_utils

    results["dynamo_counters"] = {k: dict(v) for k, v in dynamo_utils.counters.items()
                                  if k in ("stats", "recompiles", "frames")}
    save()
    say("done")
    print((out / "gpu_checks.md").read_text())


if __name__ == "__main__":
    main()

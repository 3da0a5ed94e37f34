"""End-to-end runs on the real embedded data: single process, DDP on 2 CPU processes, resume."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, TINY, column, needs_fashion_mnist, read_metrics, read_summary, run_cli
from tests.processes import start_cli_process

pytestmark = [pytest.mark.slow, needs_fashion_mnist]

SUMMARY_KEYS = {"method", "backbone", "data", "global_step", "train_loss", "knn_top1", "knn_top1_random_init",
                "knn_top1_pixels", "linear_probe_top1", "eval_protocol", "images_per_sec", "flops_per_step",
                "tflops_per_sec", "mfu", "peak_tflops", "mfu_protocol", "peak_memory_mb",
                "wall_time_sec", "checkpoint", "lr", "global_batch_size", "skipped_images", "status", "reason",
                "skipped_steps", "knn_history"}


def tiny_step_flops(images):
    """count_flops of one TINY SimCLR training step (forward and backward, the online probe's
    included) on `images` image pairs at 28 px, the method built apart from any run."""
    from sslrun.config import compose
    from sslrun.models.flops import count_flops
    from sslrun.train import build_method, lr_schedule

    cfg = compose(TINY)
    method = build_method(cfg, lr_schedule(cfg, 60000)[0], num_classes=10, steps_per_epoch=937)
    batch = {"views": [torch.randn(images, 1, 28, 28) for _ in range(2)], "label": torch.randint(0, 10, (images,)),
             "index": torch.arange(images)}
    return count_flops(lambda: method.training_step(batch, 0)["loss"].backward())


def assert_learned(run_dir, steps):
    summary = read_summary(run_dir)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["global_step"] == steps
    assert (summary["status"], summary["reason"], summary["skipped_steps"]) == ("completed", None, 0)
    assert summary["knn_top1"] > summary["knn_top1_random_init"] + 0.1, summary
    assert summary["images_per_sec"] > 0 and summary["checkpoint"].endswith("last.ckpt")
    losses = [v for _, v in column(read_metrics(run_dir), "train/loss")]
    assert len(losses) >= steps - 1
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses  # loss falls
    return summary


def test_single_process_run_learns_and_reports(tmp_path):
    # 60000 / 64 = 937 steps per epoch: warmup_epochs=0.01 is 9 warmup steps of 40.
    result = run_cli(*TINY, "trainer.max_steps=40", "scheduler.warmup_epochs=0.01", f"hydra.run.dir={tmp_path}")
    summary = assert_learned(tmp_path, 40)
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 64
    # kNN against wall time: the random init at step 0, then the final evaluation
    history = summary["knn_history"]
    assert [h["step"] for h in history] == [0, 40]
    assert [h["knn_top1"] for h in history] == [summary["knn_top1_random_init"], summary["knn_top1"]]
    assert 0 <= history[0]["wall_time_sec"] < history[1]["wall_time_sec"] < summary["wall_time_sec"]
    assert summary["flops_per_step"] == tiny_step_flops(64) > 0
    assert summary["tflops_per_sec"] > 0
    assert summary["mfu"] is None and summary["peak_tflops"] is None  # no peak is known for the CPU
    assert "no peak known for cpu" in summary["mfu_protocol"]
    assert summary["lr"] == pytest.approx(0.075 * 8)  # the quick recipe's rule: 0.075 * sqrt(batch)
    assert "lr = 0.075 x sqrt(64) = 0.6" in result.stdout + result.stderr  # effective lr logged
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    lrs = dict(column(read_metrics(tmp_path), "lr"))
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(0.6)
    assert all(lrs[i] < lrs[i + 1] for i in range(9))  # linear warmup
    assert lrs[10] > lrs[20] > lrs[39] > 0  # cosine decay
    assert result.stdout.strip().splitlines()[-1].endswith(f"summary: {tmp_path}/summary.json")


def test_ddp_on_two_processes_shards_the_data_and_learns(tmp_path):
    overrides = [*TINY, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=30",
                 "scheduler.warmup_epochs=0.01", "logger=tensorboard"]
    run_cli(str(tmp_path), *overrides, script=str(REPO / "tests" / "ddp_script.py"))
    summary = read_summary(tmp_path)
    assert summary["world_size"] == 2 and summary["global_step"] == 30
    # Per process: the count of a 32-image step (half the global batch), but for NT-Xent's
    # anchors x candidates matmul, whose candidates are the gathered 2 x 64 rows, not 2 x 32:
    # forward and both operands' gradients, 3 x 2 x 64 anchors x 64 more candidates x 64 dims.
    assert summary["flops_per_step"] == tiny_step_flops(32) + 3 * 2 * 64 * 64 * 64
    assert summary["knn_top1"] > summary["knn_top1_random_init"] + 0.1, summary
    ranks = [torch.load(tmp_path / f"indices_rank{r}.pt") for r in range(2)]
    assert [len(r) for r in ranks] == [30 * 32, 30 * 32]  # 64 global = 32 per process
    assert len(set(ranks[0].tolist()) & set(ranks[1].tolist())) == 0  # disjoint shards in the epoch
    assert len(set(ranks[0].tolist())) == 30 * 32  # no repeats within an epoch
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_run_resumes_step_counter_and_schedule(tmp_path):
    from sslrun.callbacks.checkpoints import PENDING_ROW
    from sslrun.config import compose
    from sslrun.train import lr_schedule

    common = [*TINY, "trainer.max_steps=32", "trainer.checkpoint_every_n_steps=8", "eval.every_n_epochs=0"]
    schedule, _ = lr_schedule(compose(common), 60000)  # what an uninterrupted run logs at each step

    resumed = tmp_path / "resumed"
    process = start_cli_process([*common, f"hydra.run.dir={resumed}"], REPO, os.environ, os.devnull, os.devnull)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step_000008.ckpt").exists():
        assert process.exitcode is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.join()
    assert not (resumed / "summary.json").exists(), "the run finished before it was killed"
    # Step 7's metrics are logged after the checkpoint at its end is made: they travel in it.
    pending = torch.load(resumed / "checkpoints" / "step_000008.ckpt", map_location="cpu", weights_only=True)
    assert pending[PENDING_ROW]["step"] == 7 and pending[PENDING_ROW]["metrics"]["lr"] == pytest.approx(schedule(7))
    steps_before = {s for s, _ in column(read_metrics(resumed), "lr")} if (resumed / "csv").exists() else set()

    result = run_cli(*common, f"hydra.run.dir={resumed}")
    assert "resuming from" in result.stderr + result.stdout
    summary = read_summary(resumed)
    assert summary["global_step"] == 32
    resumed_lr = column(read_metrics(resumed), "lr")
    after = [(s, v) for s, v in resumed_lr if s not in steps_before]
    first_step = after[0][0]
    # step 7's row is the checkpoint's pending one: the resumed run writes it when the kill came first
    assert 7 <= first_step < 32, "the resumed run must continue, not restart at step 0"
    assert [step for step, _ in resumed_lr] == list(range(32))  # every step once, wherever the kill landed
    for step, lr in after:
        assert lr == pytest.approx(schedule(step)), step  # the schedule continues where it stopped
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 32 and checkpoint["optimizer_states"][0]["state"]


def test_configs_ship_with_a_non_editable_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(REPO)], check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import sslrun; print(sslrun.__file__)"], cwd=elsewhere,
                           env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))
    result = run_cli("method=simclr", "trainer=ddp", "--cfg", "job", cwd=elsewhere, env=env, fresh=True)
    assert "name: simclr" in result.stdout and "name: ddp" in result.stdout


def test_wandb_logs_offline_resumes_its_run_and_never_writes_the_api_key(tmp_path):
    pytest.importorskip("wandb")
    secret = "f00dfeed" * 5  # shaped like a W&B key
    common = [*TINY, "logger=wandb", "logger.offline=true", "eval.knn.bank_size=200", "eval.knn.query_size=100",
              f"hydra.run.dir={tmp_path}"]
    env = {"WANDB_API_KEY": secret, "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    run_cli(*common, "trainer.max_steps=6", env=env)
    # Resumed (as a requeued job is): the same W&B run, now with the checkpoint as an artifact.
    run_cli(*common, "trainer.max_steps=8", "logger.log_checkpoint=true", env=env)
    offline_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(list(run.glob("*.wandb")) for run in offline_runs)
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    assert [run.name.rsplit("-", 1)[1] for run in offline_runs] == [run_id, run_id]
    records = next(offline_runs[1].glob("*.wandb")).read_bytes()
    assert f"model-{run_id}".encode() in records and b"backbone.safetensors" in records  # the artifact
    assert b"simclr-resnet18-fashion_mnist" in records  # the run's name
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"API key written to {path}"


def test_mixed_precision_clipping_and_accumulation(tmp_path):
    # bf16 convolutions are emulated on CPUs without bf16 units (~20x slower): a small batch.
    run_cli(*TINY, "data.batch_size=16", "trainer.max_steps=4", "trainer.precision=bf16-mixed",
            "trainer.gradient_clip_val=1.0", "trainer.accumulate_grad_batches=2", "eval.knn.bank_size=200",
            "eval.knn.query_size=100", f"hydra.run.dir={tmp_path}")
    summary = read_summary(tmp_path)
    assert summary["global_step"] == 4 and summary["global_batch_size"] == 32
    assert summary["lr"] == pytest.approx(0.075 * 32 ** 0.5)
    assert torch.isfinite(torch.tensor(summary["train_loss"])) and 0 <= summary["knn_top1"] <= 1
    steps = [step for step, _ in column(read_metrics(tmp_path), "train/loss")]
    assert steps == [0, 1, 2, 3]  # logged per optimizer step, each of 2 accumulated micro-batches

"""Sweeps on a real SLURM cluster through hydra/launcher=slurm (submitit): a 2-job sweep and its
report, and a 2-task DDP job that is preempted, checkpoints, is requeued and resumes.

The cluster is Debian's slurm-wlm on this machine (scripts/slurm_cluster.sh; `make test` installs
it when run as root). Without it these tests skip, unless SSLRUN_REQUIRE_SLURM=1 (CI) makes that
a failure.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import REPO, TINY, column, needs_fashion_mnist, read_metrics, read_summary
from tests.test_report import parse_table

pytestmark = [pytest.mark.slow, needs_fashion_mnist]

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster; the environment that reaches it."""
    daemons = ("slurmctld", "slurmd", "munged")
    missing = [tool for tool in daemons if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin")]
    if missing or os.geteuid() != 0:
        reason = f"no SLURM cluster here ({'missing ' + ', '.join(missing) if missing else 'not root'}): " \
                 f"scripts/slurm_cluster.sh install, as root"
        if os.environ.get("SSLRUN_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    directory = Path("/tmp") / f"sslrun-slurm-{os.getpid()}"  # short: unix socket paths live in it
    started = subprocess.run([str(CLUSTER_SCRIPT), "start", str(directory)], capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    # A session that itself runs in a SLURM job must not hand its job's variables to sbatch.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env = {**inherited, "SLURM_CONF": str(directory / "slurm.conf"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}:/usr/sbin"}
    yield env
    subprocess.run([str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


def sweep(env, sweep_dir, *overrides, background=False):
    """`python -m sslrun -m ... hydra/launcher=slurm` as a user types it (it waits for the jobs)."""
    command = [sys.executable, "-m", "sslrun", "-m", *TINY, "hydra/launcher=slurm", "trainer.accelerator=cpu",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep_dir}",
               *overrides]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def job_logs(sweep_dir: Path, tail: Optional[int] = 3000) -> str:
    """The submitit logs of every job and task (the last `tail` characters of each; None: all)."""
    return "\n".join(f"--- {p}\n{p.read_text()[-(tail or 0):]}"
                     for p in sorted((sweep_dir / ".submitit").rglob("*_log.*")))


def test_sweep_of_two_jobs_on_slurm_writes_summaries_and_a_report(slurm, tmp_path):
    result = sweep(slurm, tmp_path, "optimizer.base_lr=0.05,0.1", "trainer.max_steps=8", "eval.knn.bank_size=500",
                   "eval.knn.query_size=200")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + job_logs(tmp_path)
    summaries = [read_summary(tmp_path / str(job)) for job in (0, 1)]
    for lr, summary in zip(("0.05", "0.1"), summaries):
        assert summary["global_step"] == 8 and summary["world_size"] == 1
        assert summary["run_name"].startswith("simclr-resnet18-fashion_mnist ")
        assert f" optimizer.base_lr={lr} " in summary["run_name"]
    assert [s["lr"] for s in summaries] == [pytest.approx(0.05 * 8), pytest.approx(0.1 * 8)]  # sqrt(64) rule
    tasks = sorted(p.name for p in (tmp_path / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1  # one SLURM array, a task per job

    report = subprocess.run([sys.executable, "-m", "sslrun.report", str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=slurm)
    assert report.returncode == 0, report.stderr
    rows = parse_table((tmp_path / "report" / "report.md").read_text())
    assert [r["run"] for r in rows] == ["0", "1"]
    assert [r["optimizer.base_lr"] for r in rows] == ["0.05", "0.1"]
    for row, summary in zip(rows, summaries):  # each job's own numbers
        assert float(row["train_loss"]) == pytest.approx(summary["train_loss"], rel=5e-4)
        assert float(row["knn_top1"]) == pytest.approx(summary["knn_top1"], rel=5e-4)
        assert int(row["global_step"]) == 8
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0


def test_preempted_ddp_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """2 tasks: Lightning takes ranks from SLURM. USR2 (SLURM's warning) -> checkpoint on both
    ranks, submitit requeues, the job resumes from that checkpoint in the same run directory and
    finishes. (That a resumed run keeps its W&B run id: tests/test_train.py.)"""
    steps = 32
    launcher = sweep(slurm, tmp_path, "trainer=ddp", "trainer.devices=2", f"trainer.max_steps={steps}",
                     "trainer.checkpoint_every_n_steps=2", "eval.enabled=false", "data.batch_size=32",
                     background=True)
    run_dir = tmp_path / "0"
    try:
        job = _wait_for_training(slurm, tmp_path, run_dir, launcher)
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True, timeout=30)
        output, _ = launcher.communicate(timeout=480)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = job_logs(tmp_path, tail=None)
    assert launcher.returncode == 0, output[-3000:] + job_logs(tmp_path)

    summary = read_summary(run_dir)
    assert summary["global_step"] == steps and summary["world_size"] == 2
    assert "checkpointing at step" in logs and "resuming from" in logs, logs
    checkpointed = int(logs.split("checkpointing at step ")[1].split(",")[0])
    assert 2 <= checkpointed < steps and f"resuming from {run_dir}/checkpoints/last.ckpt" in logs
    logged_steps = [s for s, _ in column(read_metrics(run_dir), "train/loss")]
    assert logged_steps[-1] == steps - 1 and len(set(logged_steps)) == len(logged_steps) == steps, logged_steps
    # Both tasks handed over to submitit: process 0 requeued the job, process 1 left that to it.
    assert "Calling checkpoint method." in logs and "since I am a slave (procid=1)" in logs


def _wait_for_training(env, sweep_dir, run_dir, launcher, timeout=300) -> str:
    """The SLURM job id, once the job has written its first step checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()[-3000:] + job_logs(sweep_dir)
        if (run_dir / "checkpoints" / "step_000002.ckpt").exists():
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
            assert len(jobs) == 1, jobs
            return jobs[0]
        time.sleep(0.5)
    raise AssertionError("the job did not start training in time:\n" + job_logs(sweep_dir))

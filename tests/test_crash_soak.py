"""Crash consistency: runs killed with SIGKILL at random moments (during training steps, checkpoint
saves, evaluations and the requeue path) and resumed with resume=auto until done end exactly as an
uninterrupted run does: the same final weights, every training step once in csv/metrics.csv.

Each kill waits for the run to pass a random step (spread over the run, read off its step
checkpoints, so it means the same on fast and slow machines), is then aimed at a phase (a random
moment, a checkpoint's temporary file, an evaluation's start in the log, the requeue's checkpoint),
and the phase it landed in is read off the run dir at that moment; the test prints how many landed
where.
"""

import collections
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslrun.run_dir import RunDir, step_of
from sslrun.train import is_intact
from tests.conftest import REPO, column, read_metrics, read_summary, run_cli
from tests.processes import start_cli_process

pytestmark = pytest.mark.slow

TRAINING_IMAGES = 512
# strategy: (its overrides, epochs, global batch); 32 images per process and step everywhere.
STRATEGIES = {
    "single": ([], 5, 32),
    "ddp": (["trainer=ddp", "trainer.devices=2"], 2, 64),
    "fsdp": (["trainer=fsdp", "trainer.devices=2"], 2, 64),
}
# The kills per strategy, each aimed at a phase. The requeue path needs SLURM's environment, which
# a local run on 2 processes cannot fake (its processes are not SLURM tasks): 1 process only. On 2
# processes, the phases where the processes must agree: an evaluation (DDP) and a sharded save.
KILLS = {
    "single": ["random", "checkpoint save", "evaluation", "requeue"],
    "ddp": ["evaluation"],
    "fsdp": ["checkpoint save"],
}
# A SLURM job of one task, as far as Lightning and sslrun's requeue handler can tell.
FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "soak", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """512 training and 64 held-out 28 px grey images in 4 classes (a bright square per quadrant)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAINING_IMAGES), ("val", 64)):
        for index in range(count):
            label = index % 4
            pixels = rng.integers(0, 80, (28, 28), dtype=np.uint8)
            row, col = divmod(label, 2)
            pixels[row * 14 + 2: row * 14 + 12, col * 14 + 2: col * 14 + 12] += 150
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root


def total_steps(strategy: str) -> int:
    _, epochs, batch = STRATEGIES[strategy]
    return epochs * (TRAINING_IMAGES // batch)


def args(image_folder: Path, run_dir: Path, strategy: str) -> list:
    overrides, epochs, batch = STRATEGIES[strategy]
    return [
        "method=simclr", "backbone.timm_kwargs={channels:[8,16,32,64]}", "method.projector.hidden_dim=64",
        "method.projector.out_dim=32", "data=imagefolder", f"data.root={image_folder}", "data.image_size=28",
        "data.channels=1", "data.mean=[0.3]", "data.std=[0.3]", f"data.batch_size={batch}", "data.num_workers=0",
        "augmentation=simclr_views_small", f"trainer.max_epochs={epochs}", "trainer.checkpoint_every_n_steps=3",
        "trainer.keep_checkpoints=2", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        "eval.every_n_epochs=1", "eval.knn.bank_size=null", "eval.pictures=0", *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def _log(run_dir: Path) -> str:
    path = run_dir / "sslrun.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _partial_checkpoints(run_dir: Path) -> list:
    return list((run_dir / "checkpoints").glob("*.tmp")) if (run_dir / "checkpoints").exists() else []


def _phase_now(run_dir: Path) -> str:
    """Where the run is, from what it has written: a checkpoint's temporary file, or its last log line."""
    if _partial_checkpoints(run_dir):
        return "checkpoint save"
    lines = [line for line in _log(run_dir).splitlines() if "[sslrun" in line]
    last = lines[-1] if lines else ""
    if "OnlineEvaluation at step" in last:
        return "evaluation"
    if "then requeueing the job" in last:
        return "requeue"
    return "training step"


def _wait(condition, process, timeout=120.0, poll=0.002) -> bool:
    """True once `condition()` holds; False if the process ends or `timeout` passes first."""
    deadline = time.time() + timeout
    while not condition():
        if process.exitcode is not None or time.time() > deadline:
            return False
        time.sleep(poll)
    return True


def _newest_step(run_dir: Path) -> int:
    checkpoints = RunDir(run_dir).step_checkpoints() if (run_dir / "checkpoints").exists() else []
    return step_of(checkpoints[0]) if checkpoints else -1


def target_steps(strategy: str, rng: random.Random) -> list:
    """Where each kill waits for the run to get to first: one random step in each of as many equal
    parts of the first 80% of the run as there are kills, so that kills land at every stage of it on
    a fast machine and a slow one alike, and the last one still finds the run training."""
    kills, total = len(KILLS[strategy]), total_steps(strategy)
    part = 0.8 * total / kills
    return [int(rng.uniform(index * part, (index + 1) * part)) for index in range(kills)]


def kill_once(aim: str, target: int, run_dir: Path, strategy: str, image_folder: Path, rng: random.Random) -> str:
    """Start (or resume) the run, let it write a step checkpoint at or past `target` (and past any
    already there: this process is training, its signal handlers set), then kill it as `aim` says;
    the phase the kill landed in."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(FAKE_SLURM if aim == "requeue" else {})}
    before, target = _log(run_dir), max(target, _newest_step(run_dir) + 1)
    process = start_cli_process(args(image_folder, run_dir, strategy), REPO, env, run_dir.parent / "out.txt",
                                run_dir.parent / "err.txt")
    new_log = lambda: _log(run_dir)[len(before):]  # noqa: E731  (sslrun.log is appended to)
    landed = _wait(lambda: _newest_step(run_dir) >= target, process)
    if landed and aim == "random":
        landed = not _wait(lambda: False, process, timeout=rng.uniform(0.0, 0.5))
    elif landed and aim == "checkpoint save":
        landed = _wait(lambda: bool(_partial_checkpoints(run_dir)), process)
    elif landed and aim == "evaluation":  # one after training began (not the baseline before it)
        landed = _wait(lambda: re.search(r"OnlineEvaluation at step [1-9]", new_log()), process)
    elif landed and aim == "requeue":  # SLURM's warning signal, then the kill while it checkpoints
        try:
            os.kill(process.pid, signal.SIGUSR2)
            landed = _wait(lambda: "then requeueing the job" in new_log(), process)
        except ProcessLookupError:  # it ended between the two
            landed = False
    phase = _phase_now(run_dir) if landed else "finished first"
    if process.exitcode is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.join()
    return phase


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_result(strategy, image_folder, tmp_path):
    from safetensors.torch import load_file

    reference = tmp_path / "uninterrupted" / "run"
    reference.parent.mkdir()
    run_cli(*args(image_folder, reference, strategy), ranks=1)
    killed = tmp_path / "killed" / "run"
    killed.parent.mkdir()
    rng = random.Random(f"soak-{strategy}")
    targets = target_steps(strategy, rng)
    phases = collections.Counter(kill_once(aim, target, killed, strategy, image_folder, rng)
                                 for aim, target in zip(KILLS[strategy], targets))
    print(f"\n{strategy}: kills after steps {targets} landed in {dict(phases)}")
    assert phases["finished first"] == 0, phases

    layout = RunDir(killed)
    intact = [str(p) for p in [layout.last_checkpoint, *layout.step_checkpoints()] if p.exists() and is_intact(p)]
    result = run_cli(*args(image_folder, killed, strategy))  # resume=auto, to the end
    resumed = re.search(r"resuming from (\S+)", result.stdout + result.stderr)
    assert (resumed.group(1) if resumed else None) == (intact[0] if intact else None)  # the newest intact one
    summary = read_summary(killed)
    assert summary["status"] == "completed" and summary["global_step"] == total_steps(strategy)
    steps = [step for step, _ in column(read_metrics(killed), "train/loss")]
    assert steps == list(range(total_steps(strategy))), steps  # each step once, in order, none lost
    final, expected = load_file(killed / "backbone.safetensors"), load_file(reference / "backbone.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert read_summary(killed)["knn_top1"] == pytest.approx(read_summary(reference)["knn_top1"], abs=1e-6)
    # every epoch's evaluation once, whatever the kills: kNN against wall time travels in the checkpoints
    history, expected_history = summary["knn_history"], read_summary(reference)["knn_history"]
    assert [h["step"] for h in history] == [h["step"] for h in expected_history]
    assert [h["knn_top1"] for h in history] == pytest.approx([h["knn_top1"] for h in expected_history], abs=1e-6)

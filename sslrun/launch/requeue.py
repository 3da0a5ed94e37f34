"""Preemption and time limits on SLURM: checkpoint, requeue, resume in the same run directory.

SLURM warns a job with a signal (`--signal=USR2@120`) before it preempts it or its time runs out.
Under `hydra/launcher=slurm`, submitit has installed its handler for that signal before the run
starts: it pickles the job and requeues it, but knows nothing of the model; Lightning's own SLURM
handler listens for SIGUSR1, which submitit never sends. So one handler here does both parts. The
signal itself is only recorded; at the next optimizer-step boundary every process agrees that it
came (one all-reduce of a flag), they save `checkpoints/last.ckpt` together, and once the step's
metrics are logged they hand over: to submitit's handler where submitit started the job (process 0
requeues the pickled job and exits), or to `scontrol requeue` under a plain sbatch script. The
requeued job starts in the same run directory, and `resume=auto` continues from that checkpoint.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

from sslrun.config import ConfigError, signal_number

log = logging.getLogger("sslrun")


def check_requeue_signal(name: str) -> None:
    """submitit (hydra/launcher=slurm) asks SLURM for its own signal; sslrun must listen for it."""
    submitit_signal = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    same = signal_number(name) == signal_number(submitit_signal)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and not same:
        raise ConfigError(f"trainer.requeue_signal={name}: submitit warns this job with {submitit_signal} "
                          f"(SUBMITIT_PREEMPT_SIGNAL); set trainer.requeue_signal={submitit_signal}")


class Requeue(L.Callback):
    """Checkpoint to `checkpoint_path` on signal `signum`, then requeue the SLURM job.

    `on_preempted(trainer, reason)` runs on process 0 just before the hand-over (summary.json
    says the run was preempted). `exit_wait_s`: how long processes other than 0 wait for the requeue to end them before they
    exit on their own (process 0 may still be requeueing; a task that ends early can end the step).
    """

    def __init__(self, signum: int, checkpoint_path: Path,
                 on_preempted: Optional[Callable[[L.Trainer, str], None]] = None, exit_wait_s: float = 120.0):
        self.signum = signum
        self.on_preempted = on_preempted
        self.checkpoint_path = Path(checkpoint_path)
        self.exit_wait_s = exit_wait_s
        self.received = False
        self.checkpointed = False
        self.previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's signal connector has recorded the handlers it restores at the end.
        self.previous = signal.signal(self.signum, self._record)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # the hand-over ends training with SystemExit, past teardown

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def _record(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.checkpointed or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: wait for the optimizer step
        flag = torch.tensor([float(self.received)], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if not flag.item():
            return
        if trainer.is_global_zero:
            log.warning("%s: checkpointing at step %d, then requeueing the job", signal.Signals(self.signum).name,
                        trainer.global_step)
        trainer.save_checkpoint(str(self.checkpoint_path), weights_only=False)
        self.checkpointed = True

    # The hand-over waits for the step's metrics, which Lightning logs after on_train_batch_end.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.checkpointed:
            self._hand_over(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.checkpointed:  # the signal came in the last step: the requeued job only evaluates
            self._hand_over(trainer)

    def _hand_over(self, trainer: L.Trainer) -> None:
        _close_loggers(trainer)
        if trainer.is_global_zero and self.on_preempted is not None:
            self.on_preempted(trainer, f"{signal.Signals(self.signum).name} at step {trainer.global_step}: "
                                       f"checkpointed and requeued; the requeued job resumes from {self.checkpoint_path}")
        if callable(self.previous):
            # submitit's handler: process 0 dumps the job, requeues it and exits; the others return.
            self.previous(self.signum, None)
        elif trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            subprocess.run(["scontrol", "requeue", job], check=True)
            log.warning("requeued SLURM job %s", job)
            sys.exit(-1)
        # The requeue ends this process with SIGTERM (submitit ignores it; then SIGKILL); end here
        # rather than in Lightning's SIGTERM handler, which would talk to process 0, gone by now.
        signal.signal(signal.SIGTERM, _exit)
        deadline = time.time() + self.exit_wait_s
        while time.time() < deadline:
            time.sleep(1)
        sys.exit(-1)


def _exit(signum, frame) -> None:
    sys.exit(-1)


def _close_loggers(trainer: L.Trainer) -> None:
    """Write out what the loggers hold before the requeue kills the job; a W&B run ends cleanly
    (its service would be killed mid-write) and the requeued job resumes it by id."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish(exit_code=1)

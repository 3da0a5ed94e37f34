"""Checkpoints on the step grid that a resumed run can trust."""

from typing import Callable

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoints(ModelCheckpoint):
    """Lightning's checkpoints every N steps, with two guarantees for a run killed at any moment:

    - held back while `paused()` (the non-finite guard's `pause_checkpoints`: a run of
      non-finite steps), so they never replace the good ones;
    - the loggers write out what they hold before any checkpoint is made (this one, the requeue's,
      the final one), so csv/metrics.csv has every step before a checkpoint's when it resumes.
    """

    def __init__(self, paused: Callable[[], bool], **kwargs):
        super().__init__(**kwargs)
        self.paused = paused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.paused():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()

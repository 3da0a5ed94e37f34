"""Checkpoints on the step grid that a resumed run can trust."""

from typing import Callable, Optional

from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.callbacks import ModelCheckpoint

PENDING_ROW = "sslrun_pending_metrics"  # checkpoint key: the step's metrics not yet handed to the loggers


class StepCheckpoints(ModelCheckpoint):
    """Lightning's checkpoints every N steps, with two guarantees for a run killed at any moment:

    - held back while `paused()` (the non-finite guard's `pause_checkpoints`: a run of
      non-finite steps), so they never replace the good ones;
    - csv/metrics.csv has every step before a checkpoint's when the run resumes from it. The
      loggers write out what they hold before any checkpoint is made (this one, the requeue's, the
      final one); but a checkpoint made at a step's end comes before Lightning logs that step's
      metrics, so those go into the checkpoint, and a run resumed from it logs them first.
    """

    def __init__(self, paused: Callable[[], bool], **kwargs):
        super().__init__(**kwargs)
        self.paused = paused
        self.row_pending = False  # from a step's start until Lightning logs its metrics

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.row_pending = True  # (the step before has been logged by now)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.row_pending = False
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.paused():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
        row = self._pending_row(trainer) if self.row_pending else None
        if row is not None:
            checkpoint[PENDING_ROW] = row

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        row = checkpoint.get(PENDING_ROW)
        if row:
            for logger in trainer.loggers:
                logger.log_metrics(metrics=row["metrics"], step=row["step"])
                logger.save()

    @staticmethod
    def _pending_row(trainer) -> Optional[dict]:
        """The row Lightning is about to log for this step, resolved as its logger connector does
        (a logged `step` wins, else the count of stepped batches, with the epoch added)."""
        if trainer.fit_loop._should_accumulate():
            return None  # mid-accumulation: nothing is logged for this batch
        metrics = {name: float(value)
                   for name, value in convert_tensors_to_scalars(trainer._logger_connector.metrics["log"]).items()}
        if not metrics:
            return None
        step = metrics.pop("step", None)
        if step is None:
            metrics.setdefault("epoch", trainer.current_epoch)
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        return {"metrics": metrics, "step": int(step)}

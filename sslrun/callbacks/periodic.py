"""When online evaluations run, shared by the kNN / probe and the image-text evaluations."""

import logging
from typing import Dict, Optional

import lightning as L

log = logging.getLogger("sslrun")


class PeriodicEvaluation(L.Callback):
    """Calls `evaluate` every `every_n_epochs` epochs (0: never; at the epoch's last batch, or at
    its end where the loader has no length) and once at the end of training, not twice at one
    step. `results` (the latest numbers, and the before-training baselines the
    subclass records) and the last evaluated step travel in checkpoints, so a resumed run neither
    repeats nor loses them. Subclasses implement `evaluate` and set `evaluated_at_step` in it."""

    def __init__(self, every_n_epochs: int):
        self.every_n_epochs = every_n_epochs
        self.results: Dict[str, float] = {}
        self.evaluated_at_step: Optional[int] = None

    def evaluate(self, trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A due epoch's evaluation runs at its last batch's end, before that step's checkpoint
        (Lightning runs checkpoint callbacks last): a run killed after that checkpoint and resumed
        from it starts the next epoch, and would otherwise never make this evaluation."""
        if batch_idx + 1 == trainer.num_training_batches:
            self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due and self.evaluated_at_step != trainer.global_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.evaluated_at_step != trainer.global_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info("%s at step %d", type(self).__name__, trainer.global_step)
        self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"results": dict(self.results), "evaluated_at_step": self.evaluated_at_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict["results"])
        self.evaluated_at_step = state_dict["evaluated_at_step"]

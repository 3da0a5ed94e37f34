"""Training throughput (images/sec over all processes) for the progress bar and the summary."""

import time

import lightning as L


class Throughput(L.Callback):
    """Wall time between consecutive training batches, data loading included.

    `images_per_batch` is the global batch of one forward pass (data.batch_size). The summary's
    rate skips each epoch's first `skip` batches (worker start-up, warm-up)."""

    def __init__(self, images_per_batch: int, skip: int = 5):
        self.images_per_batch, self.skip = images_per_batch, skip
        self.timed_images = 0
        self.timed_seconds = 0.0
        self._last = 0.0
        self._batches_this_epoch = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()
        self._batches_this_epoch = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self._batches_this_epoch += 1
        pl_module.log("img/s", self.images_per_batch / max(seconds, 1e-9), prog_bar=True)
        if self._batches_this_epoch > self.skip:
            self.timed_images += self.images_per_batch
            self.timed_seconds += seconds

    @property
    def images_per_sec(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds else float("nan")

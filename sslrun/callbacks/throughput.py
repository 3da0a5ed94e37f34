"""Training throughput (images/sec over all processes) and efficiency (model TFLOP/s and MFU per
process) for the progress bar and the summary."""

import time
from contextlib import ExitStack
from typing import Optional

import lightning as L
import torch

from sslrun.models.flops import compute_dtype, flop_counter, matmul_dtype, peak_flops, tf32_matmuls


class Throughput(L.Callback):
    """Wall time between consecutive training batches, data loading included, and the model FLOPs
    of one batch, counted once: on the first batch this callback sees (a resumed run's too).

    `images_per_batch` is the global batch of one forward pass (data.batch_size). The FLOPs are
    what runs from on_train_batch_start to on_train_batch_end on this process (its share of the
    batch): training_step's forward and backward, as models.flops counts them (matmuls,
    convolutions, attention; not the optimizer's elementwise step). With gradient accumulation
    each batch is one forward and backward, so FLOPs and rates are per batch. The MFU's peak is
    the device's for the dtype matmuls run in, from `precision` (trainer.precision) and
    `param_dtype` (FSDP's), TF32 where fp32 matmuls use it. The summary's rates skip each
    epoch's first `skip` batches (worker start-up, warm-up) and the counted batch (the counter
    slows it)."""

    def __init__(self, images_per_batch: int, precision: str = "32-true", param_dtype: Optional[str] = None,
                 skip: int = 5):
        self.images_per_batch, self.skip = images_per_batch, skip
        self.dtype = compute_dtype(precision, param_dtype)
        self.timed_images = 0
        self.timed_seconds = 0.0
        self.flops_per_step: Optional[int] = None
        self.peak: Optional[float] = None  # FLOP/s; None: unknown for this device (the CPU)
        self.device_name: Optional[str] = None
        self._counting: Optional[ExitStack] = None  # open while the counted batch runs
        self._counter = None
        self._last = 0.0
        self._batches_this_epoch = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()
        self._batches_this_epoch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_step is None and self._counting is None:
            self._counting = ExitStack()
            self._counter = self._counting.enter_context(flop_counter(pl_module, pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counted = self._counting is not None
        if counted:
            self._counting.close()
            self._counting = None
            self.flops_per_step = self._counter.get_total_flops()
            self._set_peak(pl_module.device)
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self._batches_this_epoch += 1
        seconds = max(seconds, 1e-9)
        pl_module.log("img/s", self.images_per_batch / seconds, prog_bar=True)
        pl_module.log("tflops_per_sec", self.flops_per_step / seconds / 1e12, prog_bar=True)
        if self.peak is not None:
            pl_module.log("mfu", self.flops_per_step / seconds / self.peak, prog_bar=True)
        if self._batches_this_epoch > self.skip and not counted:
            self.timed_images += self.images_per_batch
            self.timed_seconds += seconds

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._counting is not None:  # a failed counted batch: leave no counter running
            self._counting.close()
            self._counting = None

    def _set_peak(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.device_name = torch.cuda.get_device_name(device)
            self.dtype = matmul_dtype(self.device_name, self.dtype, tf32_matmuls())
            self.peak = peak_flops(self.device_name, self.dtype)
        else:
            self.device_name = device.type

    @property
    def images_per_sec(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds else float("nan")

    @property
    def tflops_per_sec(self) -> Optional[float]:
        """Per process, over the timed batches; None before any."""
        if self.flops_per_step is None or not self.timed_seconds:
            return None
        return self.flops_per_step * self.timed_images / self.images_per_batch / self.timed_seconds / 1e12

    def summary(self) -> dict:
        rate = self.tflops_per_sec
        peak = None if self.peak is None else self.peak / 1e12
        against = f"mfu over the dense {self.dtype} peak of {self.device_name}" if peak is not None else \
            f"mfu null: no peak known for {self.device_name}"
        return {
            "flops_per_step": self.flops_per_step,
            "tflops_per_sec": rate,
            "mfu": rate / peak if rate is not None and peak is not None else None,
            "peak_tflops": peak,
            "mfu_protocol": "model FLOPs of one batch on one process (torch's counter on the first batch: matmuls, "
                            "convolutions, attention; forward and backward) x batches/s over the timed batches, "
                            f"per process; {against}",
        }

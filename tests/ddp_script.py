"""A training run through the Python API with a callback that records each rank's sample indices.

Run as `python tests/ddp_script.py RUN_DIR OVERRIDES...`; Lightning relaunches this script once per
extra process, exactly as it does the CLI."""

import sys

import lightning as L
import torch

from sslrun.config import compose
from sslrun.train import run


class RecordIndices(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir, self.seen = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["index"].cpu())

    def on_train_end(self, trainer, pl_module):
        torch.save(torch.cat(self.seen), f"{self.out_dir}/indices_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_dir, *overrides = sys.argv[1:]
    run(compose(overrides), run_dir=run_dir, callbacks=[RecordIndices(run_dir)])

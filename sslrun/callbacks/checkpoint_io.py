"""Checkpoint files written atomically: a crash mid-save never destroys the previous checkpoint."""

import os
from pathlib import Path

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<path>.tmp`, flush to disk, then rename over `<path>` (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint, path: _PATH, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

"""Checkpoints written atomically (a crash mid-save never destroys the previous one), sharded
checkpoints (torch.distributed.checkpoint) and consolidated weights.

A checkpoint file is written to `<path>.tmp`, flushed and renamed over `<path>`; a write that
fails (a full disk) leaves the previous checkpoint as it was and stops the run with one line
(failures.WriteFailed) naming the file and the space it needed. Under trainer=fsdp a checkpoint
is a directory: one file of shards per process, `.metadata` (DCP's index, written last by the
coordinator) and Lightning's `meta.pt` (loop, callback and data state). DCP reshards on load, so a run resumes on any number of processes.
Every load goes through `safe_load`: nothing a checkpoint pickles runs as code.
"""

import os
import shutil
from pathlib import Path
from typing import Union

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from sslrun.distributed.safe_load import CheckedReader, check_checkpoint, load_checkpoint
from sslrun.failures import write_failed

SHARDED_FILES = (".metadata", "meta.pt")


def is_complete_sharded_checkpoint(path: Union[str, Path]) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in SHARDED_FILES)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint-file plugin, writing to `<path>.tmp`, flushing to disk, then renaming
    over `<path>` (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint, path: _PATH, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as error:
            raise write_failed(path, error, tensor_bytes(checkpoint)) from None
        finally:
            partial.unlink(missing_ok=True)


class AtomicShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy, writing each sharded checkpoint into `<path>.tmp` and
    then swapping it in, so a crash mid-save never destroys the previous checkpoint there; and
    restoring optimizer state exactly, parameters without state (never stepped yet, such as
    DINO's prototypes while frozen) included: they stay without state, as in the saved run."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".tmp")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier()
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
        except (OSError, CheckpointException) as error:  # DCP reports every process's failure on all
            if self.is_global_zero:
                shutil.rmtree(partial, ignore_errors=True)
            raise write_failed(path, _os_error(error), tensor_bytes(checkpoint) * self.world_size) from None
        self.barrier()
        if self.is_global_zero:
            _swap_in(partial, path)
        self.barrier()


    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            check_checkpoint(path)  # one line naming the file, not the unpickler's traceback
            return super().load_checkpoint(path, weights_only=True)
        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, storage_reader=CheckedReader(path))
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        saved = CheckedReader(path).read_metadata().state_dict_metadata.keys()
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = get_optimizer_state_dict(self.model, optimizer)  # gives every parameter a state
            stepped = {name for name in state["state"] if any(k.startswith(f"{key}.state.{name}.") for k in saved)}
            state["state"] = {name: value for name, value in state["state"].items() if name in stepped}
            dcp.load({key: state}, storage_reader=CheckedReader(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
            optimizer.state.clear()
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(cpu_offload=True, strict=False))
        return load_checkpoint(path / "meta.pt", map_location=None)


def tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about the size of its file."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def _os_error(error: BaseException) -> OSError:
    """The OSError behind a DCP failure (it wraps each process's exception)."""
    if isinstance(error, OSError):
        return error
    causes = [exception for exception, _ in error.failures.values()]
    return next((c for c in causes if isinstance(c, OSError)), OSError(None, _first_line(causes)))


def _first_line(causes: list) -> str:
    return str(causes[0]).strip().splitlines()[0] if causes and str(causes[0]).strip() else "write failed"


def _swap_in(new: Path, path: Path) -> None:
    """Put directory `new` at `path`; the old checkpoint there is deleted only once `new` is in place."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def full_state_dict(module: nn.Module) -> dict:
    """The whole (unsharded) state dict of `module` on CPU, on process 0 (others get {}).
    Collective under FSDP: every process must call it. Plain modules give their state dict."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)

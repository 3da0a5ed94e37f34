"""Loading checkpoints without running what they pickle: a checkpoint is a pickle, and a crafted
one runs any code it names the moment it is unpickled.

Every checkpoint sslrun writes holds only tensors, plain containers (configs are stored as plain
dicts), strings and numbers, so torch's own `weights_only` allowlist (tensors, storages, dtypes,
OrderedDict, torch.Size, torch.device) is the whole allowlist for `torch.save` files: last.ckpt,
step checkpoints, a sharded checkpoint's meta.pt. A state that needs another type is to be stored
as plain containers instead (tests/methods/test_registry.py loads every method's checkpoint this
way). A sharded checkpoint's `.metadata` is DCP's own index, which DCP reads with plain
`pickle.load`: it is unpickled here first, allowing only DCP's index records (DCP_INDEX_GLOBALS).
Anything else is refused unloaded, in one line naming the file (ConfigError). Weights are shared
as `backbone.safetensors`, which holds no code at all.
"""

import pickle
from pathlib import Path, PosixPath
from typing import List, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from sslrun.config.errors import ConfigError

# What DCP pickles into `.metadata`: its records, the path it saved to, sizes, layouts (and dtypes).
DCP_INDEX_GLOBALS = frozenset((obj.__module__, obj.__qualname__) for obj in (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorProperties,
    dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
    dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, PosixPath, torch.Size, torch.serialization._get_layout))


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """A `torch.save` file, unpickled with `weights_only=True`; refused (ConfigError) if it holds
    anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        raise _refused(path, f"it pickles {', '.join(unsafe)}" if unsafe else _first_line(error)) from None


def check_checkpoint(path: Union[str, Path]) -> None:
    """Refuse (ConfigError) a checkpoint file or sharded directory that holds anything sslrun
    never writes, before anything loads it. Reads only the pickled structure, not the tensors."""
    path = Path(path)
    if path.is_dir():
        check_dcp_index(path / ".metadata")
        path = path / "meta.pt"
    unsafe = _unsafe_globals(path)
    if unsafe:
        raise _refused(path, f"it pickles {', '.join(unsafe)}")


def pickle_parses(path: Union[str, Path]) -> bool:
    """Whether a `torch.save` file's pickled structure reads to its end (a corrupt one does not);
    whether it is safe to load is check_checkpoint's question."""
    try:
        _unsafe_globals(path)
    except Exception:  # whatever a damaged zip or pickle raises
        return False
    return True


def check_dcp_index(path: Path) -> None:
    """Refuse (ConfigError) a `.metadata` that pickles anything but DCP's index records."""
    with open(path, "rb") as file:
        try:
            _IndexUnpickler(file).load()
        except _Forbidden as error:
            raise _refused(path, f"it pickles {error}") from None


class CheckedReader(FileSystemReader):
    """DCP's file reader, refusing a crafted `.metadata` before DCP unpickles it."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        check_dcp_index(Path(self.path) / ".metadata")
        return super().read_metadata(*args, **kwargs)


class _Forbidden(pickle.UnpicklingError):
    """A global outside DCP_INDEX_GLOBALS (the message is its name)."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in DCP_INDEX_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name}")


def _unsafe_globals(path) -> List[str]:
    """The functions and classes a `torch.save` file names outside the weights_only allowlist."""
    return torch.serialization.get_unsafe_globals_in_checkpoint(path)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)


def _refused(path, what: str) -> ConfigError:
    return ConfigError(f"{path}: refused unloaded: {what}, which no sslrun checkpoint holds and which could run "
                       f"code when loaded; use a checkpoint sslrun wrote (weights are shared as backbone.safetensors)")

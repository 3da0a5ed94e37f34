"""Why a run stopped before its end: one line that names the problem and the fix, and the status
summary.json records (`completed`, `failed`, `diverged`, `preempted`; design notes)."""


class RunFailure(Exception):
    """A run that cannot go on. The message is the one line the user sees; `status` goes to
    summary.json."""

    status = "failed"


class Diverged(RunFailure):
    """The loss or the gradient norm became non-finite."""

    status = "diverged"


class WriteFailed(RunFailure):
    """A checkpoint, export or summary could not be written (a full disk, a failing device)."""


def write_failed(path, error: OSError, needed_bytes: int = 0) -> WriteFailed:
    """One line: the file, why, and for a full disk the space it needed and the space left."""
    import errno
    import shutil
    from pathlib import Path

    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return WriteFailed(f"could not write {path}: {error.strerror or error}; the previous checkpoint is intact")
    existing = next(p for p in Path(path).absolute().parents if p.exists())
    need = f"it needs about {_megabytes(needed_bytes)}, " if needed_bytes else ""
    return WriteFailed(f"could not write {path}: no space left on device ({need}"
                       f"{_megabytes(shutil.disk_usage(existing).free)} free there); the previous checkpoint is "
                       f"intact; free some space (or lower trainer.keep_checkpoints) and rerun to resume")


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MB"

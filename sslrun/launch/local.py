"""Start the other processes of a multi-process run on this machine, before the heavy imports.

Lightning's own launcher re-runs the command line from inside `Trainer.fit`, so every extra
process starts importing only after the first has finished, and a Hydra sweep (-m) would start a
sweep in each. Here the first process writes the resolved config, starts the others on it with
`python -m sslrun.launch.worker` right after validation, and all of them import in parallel. Lightning
then finds LOCAL_RANK set and launches nothing itself. Runs started by a cluster launcher (SLURM,
torchrun) already have their processes and are left alone.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf

from sslrun.redaction import redact
from sslrun.run_dir import RunDir

CLUSTER_VARIABLES = ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE")


def launched_externally() -> bool:
    return any(name in os.environ for name in CLUSTER_VARIABLES)


def needs_local_launch(cfg: DictConfig) -> bool:
    return cfg.trainer.devices > 1 and cfg.trainer.num_nodes == 1 and not launched_externally()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local_processes(cfg: DictConfig, run_dir: Path) -> List[subprocess.Popen]:
    """Start processes 1..devices-1 on the resolved config; make this process rank 0."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = RunDir(run_dir).resolved_config
    OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))), config_path)
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0",
              "WORLD_SIZE": str(cfg.trainer.devices)}
    processes = [
        subprocess.Popen([sys.executable, "-m", "sslrun.launch.worker", str(config_path), str(run_dir)],
                         env={**os.environ, **shared, "LOCAL_RANK": str(rank)})
        for rank in range(1, cfg.trainer.devices)
    ]
    os.environ.update(shared, LOCAL_RANK="0")
    threading.Thread(target=_watch, args=(processes,), daemon=True, name="sslrun-process-watch").start()
    return processes


_stopping = threading.Event()


def stop(processes: List[subprocess.Popen]) -> None:
    """End the other processes (process 0 is done, or failed and says why): not a failure of theirs."""
    _stopping.set()
    for process in processes:
        if process.poll() is None:
            process.kill()


def _watch(processes: List[subprocess.Popen]) -> None:
    """If any process fails, stop them all: the rest would wait forever in a collective."""
    while not _stopping.is_set():
        for process in processes:
            if _stopping.is_set():
                return
            code = process.poll()
            if code not in (None, 0):
                for other in processes:
                    if other.poll() is None:
                        other.kill()
                print(f"sslrun: process {processes.index(process) + 1} failed with exit code {code}; "
                      f"stopping the run", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        if all(p.poll() is not None for p in processes):
            return
        time.sleep(1)


def wait_for(processes: List[subprocess.Popen]) -> int:
    """The first non-zero exit code of the other processes, after all have ended."""
    codes = [p.wait() for p in processes]
    return next((c for c in codes if c), 0)

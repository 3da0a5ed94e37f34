"""Real processes for tests, forked from one warm server.

Every test that needs its own process (a CLI run, a rank of a gloo process group) gets one forked
from a `forkserver` that has already imported torch, Lightning, timm and sslrun, so none of them pays
the ~10 s import again (2 CPU cores). The server imports but runs no torch op, so a child inherits no
thread pool; each child is still a process of its own, with fresh state, environment and exit code.
Tests about the process itself (start-up time, running from another directory) use `fresh=True`.
"""

import atexit
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(["torch", "lightning", "timm", "sslrun.train", "tests.processes"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_in_processes(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` processes joined by gloo; raises if any of them fails.

    fn must be importable (defined at module level); results travel through files."""
    mp.start_processes(_rank_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def _cli_child(args, cwd, env, stdout_path, stderr_path, script):
    """`python -m sslrun ARGS` (or `python SCRIPT ARGS`) inside a forked child, ending as the
    interpreter would."""
    os.setpgrp()  # so a timeout can stop the run together with the processes it launched
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script or "sslrun", *args]
    code = 0
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module("sslrun", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def start_cli_process(args, cwd, env, stdout_path, stderr_path, script=None):
    """`python -m sslrun ARGS` (or `python SCRIPT ARGS`) forked from the warm server, started and
    not awaited; the child leads its own process group (`os.killpg(child.pid, ...)` stops it all)."""
    child = CONTEXT.Process(target=_cli_child, args=(list(args), str(cwd), {**env},
                                                     str(stdout_path), str(stderr_path), script))
    child.start()
    return child


def run_cli_process(args, cwd, env, timeout, fresh=False, script=None) -> subprocess.CompletedProcess:
    """`python -m sslrun ARGS` (or `python SCRIPT ARGS`) in its own process: forked from the warm
    server, or a new interpreter."""
    args = [str(a) for a in args]
    if fresh:
        command = [script] if script else ["-m", "sslrun"]
        return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        child = start_cli_process(args, cwd, env, out, err, script)
        child.join(timeout)
        if child.exitcode is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.join()
            raise subprocess.TimeoutExpired(["sslrun", *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["sslrun", *args], child.exitcode, out.read_text(), err.read_text())


def run_cli_processes(arg_lists, cwd, envs, timeout) -> list:
    """`python -m sslrun ARGS` for each of `arg_lists`, with the matching environment of `envs`,
    all started at once: their CompletedProcesses, in order. On a timeout all are stopped and the
    first one's output goes with the error."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [(Path(tmp, f"stdout{i}"), Path(tmp, f"stderr{i}")) for i in range(len(arg_lists))]
        children = [start_cli_process(args, cwd, env, *out) for args, env, out in zip(arg_lists, envs, outputs)]
        deadline = time.time() + timeout
        for child in children:
            child.join(max(0.0, deadline - time.time()))
        if any(child.exitcode is None for child in children):
            for child in children:
                if child.exitcode is None:
                    os.killpg(child.pid, signal.SIGKILL)
                child.join()
            raise subprocess.TimeoutExpired(["sslrun", *arg_lists[0]], timeout, outputs[0][0].read_text(),
                                            outputs[0][1].read_text())
        return [subprocess.CompletedProcess(["sslrun", *args], child.exitcode, out.read_text(), err.read_text())
                for args, child, (out, err) in zip(arg_lists, children, outputs)]


def run_cli_ranks(args, cwd, env, timeout, world: int) -> subprocess.CompletedProcess:
    """`python -m sslrun ARGS` as `world` processes started together, as a cluster launcher
    (torchrun, SLURM) starts them: each forked from the warm server with its rank and the
    rendezvous in its environment, so sslrun starts none itself and no process pays for imports.
    The result carries process 0's output and the first failing exit code."""
    args = [str(a) for a in args]
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
              "WORLD_SIZE": str(world)}
    envs = [{**env, **shared, "LOCAL_RANK": str(rank)} for rank in range(world)]
    results = run_cli_processes([args] * world, cwd, envs, timeout)
    code = next((r.returncode for r in results if r.returncode), 0)
    return subprocess.CompletedProcess(["sslrun", *args], code, results[0].stdout, "".join(r.stderr for r in results))

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A small but real run: a narrow ResNet-18 on Fashion-MNIST, cheap evaluation sets.
TINY = [
    "backbone.timm_kwargs={channels:[16,32,64,128]}",
    "method.projector.hidden_dim=128",
    "method.projector.out_dim=64",
    "data.batch_size=64",
    "data.num_workers=0",
    "eval.knn.bank_size=1000",
    "eval.knn.query_size=500",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make installs it)"
)


def run_cli(*args, cwd=REPO, timeout=600, env=None, check=True, fresh=False, script=None, ranks=1):
    """`python -m sslrun ARGS` (or `python SCRIPT ARGS`) in a process of its own (see
    tests/processes.py), or as `ranks` processes started as a cluster launcher starts them (give
    trainer.devices=ranks); the CompletedProcess."""
    from tests.processes import run_cli_process, run_cli_ranks

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if ranks > 1:
        result = run_cli_ranks(args, cwd, full_env, timeout, ranks)
    else:
        result = run_cli_process(args, cwd, full_env, timeout, fresh=fresh, script=script)
    if check and result.returncode != 0:
        raise AssertionError(f"sslrun {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_clis_side_by_side(*arg_lists, timeout=600, env=None) -> list:
    """Several `python -m sslrun ARGS` runs at once, one thread each (two 2-thread runs on 2 cores
    take three times as long as one after the other; two 1-thread runs, 1.25 times one): their
    CompletedProcesses. Raises if any failed."""
    from tests.processes import run_cli_processes

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    results = run_cli_processes([[str(a) for a in args] for args in arg_lists], REPO, [full_env] * len(arg_lists),
                                timeout)
    for args, result in zip(arg_lists, results):
        if result.returncode != 0:
            raise AssertionError(f"sslrun {' '.join(map(str, args))} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return results


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_finished_run(run_dir: Path, cfg, state_dict=None) -> Path:
    """A run directory as training leaves it, for what reads one (distillation's `teacher_run`):
    its config (cfg without its hydra node) and last checkpoint ({"state_dict": state_dict}, or an
    empty file when None), where sslrun.run_dir puts them."""
    import torch
    from omegaconf import OmegaConf

    from sslrun.run_dir import RunDir

    run = RunDir(run_dir)
    run.config.parent.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run.config)
    if state_dict is None:
        run.last_checkpoint.touch()
    else:
        torch.save({"state_dict": state_dict}, run.last_checkpoint)
    return Path(run_dir)


def read_summary(run_dir: Path) -> dict:
    from sslrun.run_dir import RunDir

    return json.loads(RunDir(run_dir).summary.read_text())


def read_metrics(run_dir: Path) -> list:
    import csv

    from sslrun.run_dir import RunDir

    with open(RunDir(run_dir).metrics) as f:
        return list(csv.DictReader(f))


def column(rows: list, name: str) -> list:
    """(step, value) pairs of one metric, in file order."""
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]

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


def run_cli(*args, cwd=REPO, timeout=600, env=None, check=True, fresh=False, script=None):
    """`python -m sslrun ARGS` (or `python SCRIPT ARGS`) in a process of its own (see
    tests/processes.py); the CompletedProcess."""
    from tests.processes import run_cli_process

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = run_cli_process(args, cwd, full_env, timeout, fresh=fresh, script=script)
    if check and result.returncode != 0:
        raise AssertionError(f"sslrun {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list:
    import csv

    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list, name: str) -> list:
    """(step, value) pairs of one metric, in file order."""
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]

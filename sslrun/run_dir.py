"""The layout of a run directory, in one place: training writes it, and the report, the
distillation teacher loader and the tests read it.

    .hydra/config.yaml       the composed config (Hydra)   .hydra/overrides.yaml  the command line
    checkpoints/last.ckpt    the newest state              checkpoints/step_000600.ckpt  on the step grid
    backbone.safetensors     the evaluated backbone        summary.json           the results
    csv/metrics.csv          every logged metric           pictures/              attention maps, PCA
    wandb/run_id             the W&B run it continues      config.resolved.yaml   for local worker processes
    eval/<protocol>.json     offline evaluation            benchmark.json, benchmark.out  python -m sslrun.benchmark
    eval/features/<split>_<key>.safetensors                the features an offline evaluation cached

A checkpoint is a file, or under trainer=fsdp a directory of shards. Names hold no `=` (Hydra's
override grammar would need them quoted on the command line); `step=600.ckpt`, as runs before
that change wrote them, is still found.
"""

import re
from pathlib import Path
from typing import List, Optional, Union

STEP_CHECKPOINT = "step_{step:06d}"  # ModelCheckpoint's filename template (.ckpt is added)
_STEP_NAME = re.compile(r"^step[_=](\d+)\.ckpt$")


class RunDir:
    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / ".hydra" / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.root / ".hydra" / "overrides.yaml"

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / (STEP_CHECKPOINT.format(step=step) + ".ckpt")

    def step_checkpoints(self) -> List[Path]:
        """The step checkpoints there, newest first (old `step=N.ckpt` names included)."""
        found = [p for p in self.checkpoints.glob("step*.ckpt") if step_of(p) is not None]
        return sorted(found, key=step_of, reverse=True)

    @property
    def backbone(self) -> Path:
        return self.root / "backbone.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "csv" / "metrics.csv"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / "wandb" / "run_id"

    @property
    def eval_dir(self) -> Path:
        """What `python -m sslrun.evaluate` writes: results, its log, cached features."""
        return self.root / "eval"

    def eval_result(self, protocol: str) -> Path:
        """An offline protocol's numbers and settings (python -m sslrun.evaluate)."""
        return self.eval_dir / f"{protocol}.json"

    @property
    def benchmark_record(self) -> Path:
        """What python -m sslrun.benchmark trained the run with: command, exit code, machine."""
        return self.root / "benchmark.json"

    @property
    def benchmark_output(self) -> Path:
        """The output of the training process the benchmark started."""
        return self.root / "benchmark.out"

    def eval_results(self) -> List[Path]:
        """Every protocol's result written so far."""
        return sorted(self.eval_dir.glob("*.json"))

    def feature_cache(self, split: str, key: str) -> Path:
        """Features of one split in one view, `key` naming the weights, data and view."""
        return self.eval_dir / "features" / f"{split}_{key}.safetensors"

    def rank_log(self, rank: Union[int, str]) -> Path:
        return self.root / f"rank{rank}.log"

    def looks_like_a_run(self) -> bool:
        """Anything a run writes early: a directory a run started in, finished or not."""
        return any(p.exists() for p in (self.root / ".hydra", self.root / "sslrun.log", self.metrics))


def step_of(checkpoint: Path) -> Optional[int]:
    """The step a step checkpoint was written at (from its name); None for other names."""
    match = _STEP_NAME.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None

"""The layout of a run directory, in one place: training writes it, and the report, the
distillation teacher loader and the tests read it.

    .hydra/config.yaml       the composed config (Hydra)   .hydra/overrides.yaml  the command line
    checkpoints/last.ckpt    the newest state              checkpoints/step_000600.ckpt  on the step grid
    backbone.safetensors     the evaluated backbone        summary.json           the results
    csv/metrics.csv          every logged metric           pictures/              attention maps, PCA
    wandb/run_id             the W&B run it continues      config.resolved.yaml   for local worker processes

A checkpoint is a file, or under trainer=fsdp a directory of shards. Names hold no `=` (Hydra's
override grammar would need them quoted on the command line); `step=600.ckpt`, as runs before
that change wrote them, is still found.
"""

import re
from pathlib import Path
from typing import List, Union

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
        found = [(int(m.group(1)), p) for p in self.checkpoints.glob("step*.ckpt")
                 if (m := _STEP_NAME.match(p.name))]
        return [p for _, p in sorted(found, key=lambda pair: pair[0], reverse=True)]

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

    def rank_log(self, rank: Union[int, str]) -> Path:
        return self.root / f"rank{rank}.log"

    def looks_like_a_run(self) -> bool:
        """Anything a run writes early: a directory a run started in, finished or not."""
        return any(p.exists() for p in (self.root / ".hydra", self.root / "sslrun.log", self.metrics))

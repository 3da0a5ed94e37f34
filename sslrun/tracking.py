"""Experiment tracking: the logger a run writes to, its name, its sweep group, its W&B identity.

A run is named by what distinguishes it (`dino-vit_small-imagenet optimizer.base_lr=0.3`), runs of
one sweep (-m) share a group (the sweep directory), and a W&B run keeps its id across requeues and
resumes: the id lives in the run directory next to the checkpoint it belongs to.
"""

import csv
import importlib.util
import logging
import os
import secrets
from pathlib import Path
from typing import List, Optional, Sequence

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from sslrun.config import ConfigError
from sslrun.redaction import redact
from sslrun.run_dir import RunDir

log = logging.getLogger("sslrun")

# Overrides that the name already says (the groups) or that say nothing about the run itself.
_UNNAMED_PREFIXES = ("method=", "backbone=", "data=", "hydra", "logger", "resume=", "trainer.progress_bar=")


def run_name(method: str, backbone: str, data: str, overrides: Sequence[str] = ()) -> str:
    """`<method>-<backbone>-<data>` followed by the command line's other overrides."""
    shown = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(_UNNAMED_PREFIXES)]
    return redact(" ".join([f"{method}-{backbone}-{data}", *shown]))


def hydra_job() -> tuple:
    """(the job's command-line overrides, its sweep directory or None) when Hydra started the run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return [], None
    hydra = HydraConfig.get()
    sweep = str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
    return list(hydra.overrides.task), sweep


def build_logger(logger_cfg, run_dir: Path, name: str, group: Optional[str], config: dict, resuming: bool):
    """The Lightning logger `logger_cfg.name` names, writing under `run_dir`."""
    kind = logger_cfg.name
    if kind == "csv":
        return ResumableCSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        require_package("tensorboard", "logger=tensorboard", "tensorboard")
        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        require_package("wandb", "logger=wandb", "wandb")
        offline = logger_cfg.offline if logger_cfg.offline is not None else not wandb_key_available()
        if offline and rank_zero_only.rank == 0:
            log.info("wandb: offline (no API key); afterwards: wandb sync %s/wandb/offline-run-*", run_dir)
        described = dict(project=logger_cfg.project, entity=logger_cfg.entity, name=logger_cfg.run_name or name,
                         group=logger_cfg.group or group, tags=list(logger_cfg.tags), config=config)
        return WandbLogger(save_dir=str(run_dir), id=wandb_run_id(run_dir, resuming), resume="allow", offline=offline,
                           **redact(described))
    raise ConfigError(f"logger.name={kind}: unknown logger")


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes metrics.csv when it starts in a directory that has one; this
    one keeps the rows before the first step it writes itself (a resumed or requeued run goes on
    where its checkpoint was; rows the interrupted run logged past it are dropped). Whole-file
    rewrites go through a temporary file, so a run killed mid-write never loses rows, and a last
    line cut short by a kill is dropped."""

    def __init__(self, log_dir: str):
        self._merged = False
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        pass

    def save(self) -> None:
        if self.metrics and not self._merged:
            self._merged = True
            self._keep_rows_before(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _keep_rows_before(self, step: int) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            text = file.read()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]  # a row the kill cut short
        reader = csv.DictReader(text.splitlines())
        header = list(reader.fieldnames or [])
        kept = [row for row in reader if row.get("step") and int(float(row["step"])) < step]
        if not kept:
            os.remove(self.metrics_file_path)
            return
        self.metrics_keys = sorted(header)
        self._write_rows(self.metrics_keys, kept)

    def _rewrite_with_new_header(self, fieldnames: list) -> None:
        with open(self.metrics_file_path, newline="") as file:
            self._write_rows(fieldnames, list(csv.DictReader(file)))

    def _write_rows(self, fieldnames: list, rows: list) -> None:
        partial = self.metrics_file_path + ".tmp"
        with open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """<run dir>/csv/metrics.csv, continued (not restarted) when the run resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: kept in <run dir>/wandb/run_id, reused when the run
    resumes from a checkpoint (a requeued SLURM job), new when it starts fresh. Process 0 writes it."""
    path = RunDir(run_dir).wandb_run_id
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def log_checkpoint_artifact(logger, paths: List[Path], name: str) -> None:
    """The run's final checkpoint (a file, or a directory of shards) and exported backbone as one
    W&B model artifact (uploaded now, or by `wandb sync` when offline). Process 0 only."""
    import wandb

    artifact = wandb.Artifact(name=name, type="model")
    for path in paths:
        if path.is_dir():
            artifact.add_dir(str(path), name=path.name)
        elif path.is_file():
            artifact.add_file(str(path), name=path.name)
    logger.experiment.log_artifact(artifact, aliases=["latest"])
    log.info("wandb: checkpoint logged as artifact %s", name)


def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def require_package(module: str, feature: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{feature}: needs the {module} package; pip install 'sslrun[{extra}]'")

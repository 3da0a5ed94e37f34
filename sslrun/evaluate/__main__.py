"""`python -m sslrun.evaluate RUN_DIR protocol=NAME [key=value ...]`: check, then evaluate.

As in training, the arguments are checked before anything heavy is imported: an unknown protocol,
a misspelled key, a missing run directory, a run that has no backbone.safetensors (still going,
or failed: summary.json says so) or `weights=` without its backbone each end in one line
`sslrun: error: ...` with exit status 2. The training groups (`backbone=`, `data=`, their keys)
are checked as training checks them. With devices=N this process starts N - 1 more on the same
command line (as training does), and each embeds its share of the images.
"""

import logging
import os
import subprocess
import sys
from typing import List, Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sslrun.config import ConfigError
from sslrun.evaluate.config import (app_lenient, check_source, compose_app, selects_groups, split_overrides,
                                    training_config, validate_app)
from sslrun.launch import launched_externally, stop, wait_for

log = logging.getLogger("sslrun")
_ARGV: List[str] = []  # the command line as given (the other processes of devices=N get it)
_TRAINING: dict = {}  # the training config's overrides, and what they compose to


def parse(argv: List[str]) -> Tuple[List[str], Optional[str], List[str], List[str]]:
    """(Hydra's arguments, RUN_DIR, the app's overrides, the training config's overrides)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_intermixed_args(argv)  # RUN_DIR -m protocol=knn,linear
    positional = [o for o in args.overrides if "=" not in o]
    run_dir = positional[0] if positional else None
    own, training = split_overrides([o for o in args.overrides if "=" in o])
    flags = [a for a in argv if a not in args.overrides]
    return flags, run_dir, own, training


def check(run_dir: Optional[str], own: List[str], training: List[str]) -> Optional[str]:
    """The problem with the command line, in one line, or None."""
    from sslrun.__main__ import check_overrides

    try:
        cfg = compose_app(own, run_dir=run_dir)
        check_source(cfg.run_dir, cfg.weights, training)
    except ConfigError as error:
        return str(error)
    return check_overrides(training) if selects_groups(training) else None


def main() -> None:
    flags, run_dir, own, training = parse(sys.argv[1:])
    skip = any(flag in flags for flag in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--multirun",
                                          "-m"))
    if not skip:
        problem = check(run_dir, own, training)
        if problem:
            print(f"sslrun: error: {problem}", file=sys.stderr)
            sys.exit(2)
    _ARGV[:] = sys.argv[1:]
    try:
        _TRAINING.update(overrides=training, composed=training_config(training))
    except ConfigError as error:
        print(f"sslrun: error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir_override = [f"run_dir={run_dir}"] if run_dir is not None else []
    rank = int(os.environ.get("RANK", 0))  # started by devices=N or torchrun: a log of its own
    rank_log = [f"hydra.job.name=evaluate_rank{rank}"] if rank else []
    sys.argv = [sys.argv[0], *flags, *run_dir_override, *[app_lenient(o) for o in own], *rank_log]
    _hydra_app()


@hydra.main(config_path="../conf_evaluate", config_name="evaluate", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> None:
    try:
        cfg = validate_app(cfg)
        if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.devices > 1:
            raise ConfigError(f"devices={cfg.devices}: each process would run the whole sweep (-m); evaluate one "
                              f"protocol at a time on several processes")
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(2)
    others = _start_other_processes(cfg.devices) if cfg.devices > 1 and not launched_externally() else []
    code = 1  # unless the evaluation returns
    try:
        code = _evaluate(cfg)
    finally:
        if code:
            stop(others)
    code = code or wait_for(others)
    if code:
        sys.exit(code)


def _evaluate(cfg: DictConfig) -> int:
    import torch
    import torch.distributed as dist

    from sslrun.evaluate.protocols import evaluate
    from sslrun.launch.threads import cpu_threads

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        nccl = torch.cuda.is_available() and cfg.accelerator != "cpu"
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if nccl else "gloo", rank=int(os.environ.get("RANK", 0)), world_size=world)
    try:
        evaluate(cfg, _TRAINING["overrides"], _TRAINING["composed"])
    except ConfigError as error:
        log.error("error: %s", error)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _start_other_processes(devices: int) -> List[subprocess.Popen]:
    """Processes 1..devices-1 on this command line; this one becomes process 0 (the rendezvous in
    the environment, as torchrun sets it)."""
    from sslrun.launch.local import _free_port

    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(devices),
              "LOCAL_WORLD_SIZE": str(devices)}
    others = [subprocess.Popen([sys.executable, "-m", "sslrun.evaluate", *_ARGV],
                               env={**os.environ, **shared, "RANK": str(r), "LOCAL_RANK": str(r)})
              for r in range(1, devices)]
    os.environ.update(shared, RANK="0", LOCAL_RANK="0")
    return others


if __name__ == "__main__":
    main()

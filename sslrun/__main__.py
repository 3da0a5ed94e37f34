"""`python -m sslrun key=value ...`: compose the config with Hydra, validate it, train.

Before handing over to Hydra, the overrides are composed and validated here, so that an unknown
group option, a misspelled key, a wrong type or an impossible combination ends in one line naming
the key and the valid choices, within a second and before anything heavy is imported. The method
group's own schema needs the methods imported: the app checks it, before it starts any process.
"""

import logging
import sys
from typing import List, Optional

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sslrun.config import lenient
from sslrun.launch import launch_local_processes, launched_externally, needs_local_launch, stop, wait_for

log = logging.getLogger("sslrun")


def check_overrides(overrides: List[str]) -> Optional[str]:
    """Compose `overrides` and validate all but the method's schema; the problem in one line, or None."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import InterpolationResolutionError

    from sslrun.config import ConfigError, compose
    from sslrun.config.errors import no_such_option

    try:
        compose(overrides, method_schema=False)
    except MissingConfigException as error:
        group, _, option = str(error.missing_cfg_file or "").rpartition("/")
        if group and error.options is not None:
            return no_such_option(group, option, error.options)
        return _one_line(error)
    except HydraException as error:
        return _one_line(error)
    except ConfigError as error:
        return str(error)
    except InterpolationResolutionError as error:  # ${oc.env:NAME} with NAME not set, say
        return f"{error.full_key}: {str(error).splitlines()[0]}"
    return None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(error).__name__


def main() -> None:
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(sys.argv[1:])
    skip = args.multirun or args.help or args.hydra_help or args.info or args.shell_completion or \
        args.config_path or args.config_name or args.config_dir or args.experimental_rerun
    if not skip:
        problem = check_overrides(args.overrides)
        if problem:
            print(f"sslrun: error: {problem}", file=sys.stderr)
            sys.exit(2)
    # Hydra composes with the same lenient overrides the check used; the schema check in the app
    # then catches any key that does not exist (also in sweeps and in user config files).
    sys.argv = [sys.argv[0]] + [lenient(a) if a in args.overrides else a for a in sys.argv[1:]]
    _hydra_app()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> None:
    from sslrun.config import ConfigError, validate

    _keep_secrets_out()
    try:
        _check_multirun(cfg)
        checked = validate(cfg, method_schema=False)
        _check_shared_run_dir(checked)
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # The other local processes start now and import while this one does (the method's schema
    # comes with the methods); each validates the whole config itself.
    others = launch_local_processes(checked, run_dir) if needs_local_launch(checked) else []
    from sslrun.failures import RunFailure

    try:
        cfg = validate(cfg)
        from sslrun.train import run

        run(cfg, run_dir=str(run_dir))
    except ConfigError as error:
        log.error("error: %s", error)
        code = 2
    except RunFailure as failure:  # diverged, disk full: summary.json has the status
        log.error("error: %s", failure)
        code = 1
    else:
        code = wait_for(others)
    finally:
        stop(others)
    if code:
        sys.exit(code)


def _keep_secrets_out() -> None:
    """Secrets (sslrun/redaction.py) out of the log from now on, out of sys.argv (W&B records
    it), and out of the YAML files Hydra saved before calling the app."""
    from hydra.types import RunMode

    from sslrun.redaction import redact, redact_logs, redact_yaml_files

    hydra = HydraConfig.get()
    redact_logs()
    sys.argv[:] = redact(sys.argv)
    saved = sorted((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml")) if hydra.output_subdir else []
    sweep = [Path(hydra.sweep.dir) / "multirun.yaml"] if hydra.mode == RunMode.MULTIRUN else []
    redact_yaml_files([*saved, *sweep])


def _check_shared_run_dir(cfg: DictConfig) -> None:
    """Under torchrun every process composes its own config; a time-stamped run dir could differ
    between them, so the run dir must be given."""
    import os

    from sslrun.config import ConfigError, world_size

    given = any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
    if "TORCHELASTIC_RUN_ID" in os.environ and world_size(cfg) > 1 and not given:
        raise ConfigError("torchrun starts every process on its own: give them one run directory, "
                          "hydra.run.dir=PATH (the same on every node)")


def _check_multirun(cfg: DictConfig) -> None:
    """Jobs of a sweep under the local launcher run one after another in this process; each would
    need its own process group. submitit and cluster launchers give every job its own processes."""
    from hydra.types import RunMode

    from sslrun.config import ConfigError, world_size

    hydra = HydraConfig.get()
    in_this_process = hydra.launcher._target_.endswith("BasicLauncher")
    if hydra.mode == RunMode.MULTIRUN and in_this_process and world_size(cfg) > 1 and not launched_externally():
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices}: several processes per job cannot run in a local "
            f"sweep (-m); use hydra/launcher=submitit_local or hydra/launcher=slurm, or run the jobs one by one"
        )


if __name__ == "__main__":
    main()

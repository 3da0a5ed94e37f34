"""`python -m sslrun.launch.worker CONFIG RUN_DIR`: one of the other processes of a local
multi-process run, started by `sslrun.launch.local` with LOCAL_RANK and the rendezvous set in its
environment."""

import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from sslrun.redaction import redact_logs
from sslrun.run_dir import RunDir


def main() -> None:
    config_path, run_dir = sys.argv[1], Path(sys.argv[2])
    rank = os.environ["LOCAL_RANK"]
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)  # process 0 reports; the others write their own log file
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s",
        handlers=[logging.FileHandler(RunDir(run_dir).rank_log(rank)), console],
    )
    redact_logs()
    from sslrun.config import ConfigError, validate
    from sslrun.failures import RunFailure
    from sslrun.train import run

    try:
        cfg = validate(OmegaConf.load(config_path))
    except ConfigError as error:
        # Process 0 validates the same config (it started this process before checking the
        # method's schema, so that both import at once), reports the problem and stops this one.
        logging.getLogger("sslrun").info("config error, reported by process 0: %s", error)
        time.sleep(120)
        sys.exit(2)
    try:
        run(cfg, run_dir=str(run_dir))
    except RunFailure as failure:  # every process stops at the same step; process 0 reports
        logging.getLogger("sslrun").info("stopped: %s", failure)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`python -m sslrun.launch.worker CONFIG RUN_DIR`: one of the other processes of a local
multi-process run, started by `sslrun.launch.local` with LOCAL_RANK and the rendezvous set in its
environment."""

import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

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
    from sslrun.config import ConfigError, validate
    from sslrun.train import run

    try:
        cfg = validate(OmegaConf.load(config_path))
    except ConfigError as error:
        # Process 0 validates the same config (it started this process before checking the
        # method's schema, so that both import at once), reports the problem and stops this one.
        logging.getLogger("sslrun").info("config error, reported by process 0: %s", error)
        time.sleep(120)
        sys.exit(2)
    run(cfg, run_dir=str(run_dir))


if __name__ == "__main__":
    main()

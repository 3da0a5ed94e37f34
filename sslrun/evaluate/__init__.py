"""`python -m sslrun.evaluate RUN_DIR protocol=knn|linear|finetune|stats [key=value ...]`: the
offline evaluation protocols on a finished run (README, "Offline evaluation").

    config      the app's config tree (sslrun/conf_evaluate), schemas, what is evaluated
    features    embedding a split (sharded over processes, gathered), the feature cache
    protocols   kNN, linear, fine-tuning, label-free statistics; `evaluate` writes the JSON
    __main__    the command line

From Python: `evaluate_run(run_dir, protocol, overrides) -> dict`. This module stays light (the
command line checks its arguments before torch is imported).
"""

from typing import Sequence


def evaluate_run(run_dir, protocol: str, overrides: Sequence[str] = ()) -> dict:
    """`python -m sslrun.evaluate RUN_DIR protocol=PROTOCOL OVERRIDES...` in this process (one
    process, whatever `devices` says): writes RUN_DIR/eval/<protocol>.json and returns its content.
    Config problems raise sslrun.config.ConfigError (one line)."""
    from sslrun.evaluate.config import compose_app, split_overrides
    from sslrun.evaluate.protocols import evaluate

    own, training = split_overrides(list(overrides))
    cfg = compose_app([f"protocol={protocol}", *own], run_dir=str(run_dir))
    return evaluate(cfg, training)

"""Secrets never land in run files: Hydra's .hydra/*.yaml, config.resolved.yaml, the logs,
summary.json, the loggers' configs (W&B, hparams.yaml), checkpoints' hyperparameters, run names.

A secret is the value of WANDB_API_KEY or of any environment variable whose name contains KEY,
TOKEN or SECRET (any case), when it is at least MIN_LENGTH characters long: shorter values are
switches (TOKENIZERS_PARALLELISM=false), not credentials. One gets into a run through
`${oc.env:NAME}` in a config, or typed on the command line. Wherever it would be written it
becomes `${oc.env:NAME}`: that names where it came from and resolves back to it where the
variable is set (so the local worker processes still read the run's config from
config.resolved.yaml).
"""

import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

MIN_LENGTH = 8
_SECRET_NAME = re.compile("KEY|TOKEN|SECRET", re.IGNORECASE)


def secret_values(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """{value: variable name} of the secrets in the environment, longest first (a secret that
    contains another is replaced whole)."""
    environ = os.environ if environ is None else environ
    found = {value: name for name, value in sorted(environ.items())
             if (name == "WANDB_API_KEY" or _SECRET_NAME.search(name)) and len(value) >= MIN_LENGTH}
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


def redact(obj, environ: Optional[Mapping[str, str]] = None):
    """`obj` with each secret in its strings (in nested dicts, lists and tuples, keys too)
    replaced by `${oc.env:NAME}`; anything else as it is."""
    found = secret_values(environ)
    return _redact(obj, found) if found else obj


def _redact(obj, found: Dict[str, str]):
    if isinstance(obj, str):
        for value, name in found.items():
            obj = obj.replace(value, "${oc.env:" + name + "}")
        return obj
    if isinstance(obj, dict):
        return {_redact(k, found): _redact(v, found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, found) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Secrets out of a log record's message and traceback, before a handler writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed logging call: the handler reports it as usual
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs() -> None:
    """A RedactingFilter on every handler of the root logger (a filter on a logger would miss
    the records its children propagate)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_yaml_files(paths: Iterable[Path]) -> None:
    """Rewrite each YAML file (of those that exist) that holds a secret, in place and atomically.
    Done on the parsed file, so a secret YAML had to quote or escape is found too."""
    from omegaconf import OmegaConf

    for path in filter(Path.is_file, map(Path, paths)):
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        redacted = redact(saved)
        if redacted != saved:
            partial = path.with_name(path.name + ".tmp")
            partial.write_text(OmegaConf.to_yaml(redacted))
            os.replace(partial, path)

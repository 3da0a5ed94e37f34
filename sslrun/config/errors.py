"""The one exception a config problem raises, and the wording its messages share."""

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"did you mean 'X'? " for the one choice that `word` (3 characters or more) begins (sinkhorn:
    sinkhorn_knopp) or, when it begins none, the closest to it as a typo with the same first letter
    (momentun: momentum); '' when several begin with it (bf16: bf16-mixed, bf16-true) or none is
    close (gpu is not cpu)."""
    choices = list(choices)
    close = [c for c in choices if c.startswith(word)] if len(word) >= 3 else []
    if not close:
        close = [c for c in difflib.get_close_matches(word, choices, n=1) if c[:1] == word[:1]]
    return f"did you mean '{close[0]}'? " if len(close) == 1 else ""


def no_such_option(group: str, option: str, options: Iterable[str]) -> str:
    """The message for `group=option` where the group has no such option: the closest, then all."""
    options = sorted(options)
    return (f"{group}={option}: no such {group.rpartition('/')[2]}; {did_you_mean(option, options)}"
            f"choose one of: {', '.join(options)}")


def require_choice(key: str, value, choices: Iterable) -> None:
    """`key=value` must be one of `choices`: else a ConfigError naming the closest and all of them."""
    choices = [str(c) for c in choices]
    require(str(value) in choices,
            f"{key}={value}: {did_you_mean(str(value), choices)}choose one of: {', '.join(choices)}")

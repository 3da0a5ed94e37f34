"""The one exception a config problem raises, and the wording its messages share."""

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"did you mean 'X'? " for the choice closest to a misspelled `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def no_such_option(group: str, option: str, options: Iterable[str]) -> str:
    """The message for `group=option` where the group has no such option: the closest, then all."""
    options = sorted(options)
    return (f"{group}={option}: no such {group.rpartition('/')[2]}; {did_you_mean(option, options)}"
            f"choose one of: {', '.join(options)}")

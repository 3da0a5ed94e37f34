"""The one exception a config problem raises."""


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)

"""The config: Hydra composes conf/ into one config; `validate` types it and checks it.

    errors    ConfigError, the one-line config problem
    hydra     the config tree, sslrun's resolvers, lenient overrides, `compose`
    schema    every group's typed schema but the method's (each method's lives with its class)
    validate  merging into the schemas and running their checks

Nothing here imports anything heavier than omegaconf until the method group is validated.
"""

from sslrun.config.errors import ConfigError
from sslrun.config.hydra import CONF_DIR, GROUPS, compose, lenient, register_hydra_extras
from sslrun.config.validate import merge_typed, signal_number, validate, world_size

__all__ = ["CONF_DIR", "GROUPS", "ConfigError", "compose", "lenient", "merge_typed", "register_hydra_extras",
           "signal_number", "validate", "world_size"]

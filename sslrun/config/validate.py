"""`validate`: merge each group into the dataclass that types it, then run every schema's checks.

A misspelled key, a wrong type, a missing value or an inconsistent combination fails before
anything heavy starts, with one line that names the key and what is valid. The method group's
schema comes from the method registry, which imports the methods (torch, Lightning, some
seconds): it is merged last, so a problem anywhere else is reported within a second, and the
CLI's first check leaves it out (the run validates in full before it starts any process).
"""

import signal
from dataclasses import fields, is_dataclass
from typing import List, Optional, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from sslrun.config.errors import ConfigError, did_you_mean, require
from sslrun.config.schema import GROUP_SCHEMAS, RootConfig, crop_sizes


def validate(cfg: DictConfig, method_schema: bool = True) -> DictConfig:
    """Return `cfg` merged into its typed schema, or raise ConfigError on the first problem.

    method_schema=False checks every group but the method's (whose schema needs the methods
    imported): the CLI's check of its overrides, answered within a second."""
    cfg = cfg.copy()
    with _open(cfg):
        cfg.pop("hydra", None)
    typed = merge_typed(RootConfig, cfg, prefix="", label="the top level")
    schemas = {group: _schema_for(group, cfg[group], options) for group, options in GROUP_SCHEMAS.items()}
    for group, schema in schemas.items():
        _merge_group(typed, group, schema, cfg[group], named=None not in GROUP_SCHEMAS[group])
    _check_missing(typed)
    _resolve(typed)
    for group, schema in schemas.items():
        _check_specs(schema, typed[group], group)
    for schema in (RootConfig, *schemas.values()):
        schema.check(typed)
    if not method_schema:
        return typed

    from sslrun.methods.registry import registered  # the methods' schemas: the heavy imports

    methods = registered()
    method = _schema_for("method", cfg.method, {name: spec.schema for name, spec in methods.items()})
    _merge_group(typed, "method", method, cfg.method, named=True)
    _check_missing(typed)
    _resolve(typed)
    _check_specs(method, typed.method, "method")
    method.check(typed)
    spec = methods[typed.method.name]
    views = len(crop_sizes(typed))
    require(spec.views is None or views == spec.views,
            f"augmentation: method={spec.name} takes {spec.views} views, the augmentation makes {views} "
            f"(sum of augmentation.views[*].count)")
    return typed


def world_size(cfg: DictConfig) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def signal_number(name: str) -> Optional[int]:
    """`USR2` or `SIGUSR2` -> signal.SIGUSR2; None for a name that is no signal."""
    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return found if isinstance(found, signal.Signals) else None


# ---------------------------------------------------------------------------- internals
class _open:
    """Temporarily lift struct/readonly flags so validation can rebuild nodes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        self.struct = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, self.struct)


def _schema_for(group: str, node, options: dict) -> type:
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group}: expected a config group, got {node!r}")
    if None in options:
        return options[None]
    name = node.get("name")
    if name not in options:
        raise ConfigError(f"{group}.name: unknown {group} {name!r}; {did_you_mean(str(name), options)}"
                          f"choose one of: {', '.join(options)}")
    return options[name]


def _merge_group(typed: DictConfig, group: str, schema: type, node: DictConfig, named: bool) -> None:
    label = f"{group} ({node.name})" if named else group
    with _open(typed):
        typed[group] = merge_typed(schema, node, prefix=f"{group}.", label=label)


def _check_specs(schema: type, node: DictConfig, key: str) -> None:
    """Every nested spec's own `check_spec`, depth first (e.g. each MLP head of a method)."""
    for f in fields(schema):
        spec = next((c for c in (f.type, *get_args(f.type)) if is_dataclass(c)), None)
        if spec is None or not isinstance(node.get(f.name), DictConfig):
            continue
        _check_specs(spec, node[f.name], f"{key}.{f.name}")
        if hasattr(spec, "check_spec"):
            spec.check_spec(node[f.name], f"{key}.{f.name}")


def _field_names(schema: type) -> List[str]:
    return [f.name for f in fields(schema)]


def _schema_at(schema: type, path: List[str]) -> Optional[type]:
    """The dataclass typing `path` below `schema`, looking through List[...] (None if none)."""
    for step in path:
        match = {f.name: f for f in fields(schema)}.get(step)
        if match is None:
            return None
        candidates = [match.type, *get_args(match.type)]
        schema = next((c for c in candidates if is_dataclass(c)), None)
        if schema is None:
            return None
    return schema


def merge_typed(schema: type, node: DictConfig, prefix: str, label: str) -> DictConfig:
    """`node` merged into the dataclass `schema`; an unknown key or a wrong type is a ConfigError
    naming the key (`prefix` + its path) and the valid keys of its `label`."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as e:
        path = str(e.full_key).split(".") if e.full_key else [str(e.key)]
        key = path[-1]
        parent = _schema_at(schema, [p for p in path[:-1] if not p.isdigit()])
        valid = _field_names(parent) if parent else []
        owner = ".".join([label, *path[:-1]]) if path[:-1] else label
        raise ConfigError(
            f"{prefix}{'.'.join(path)}: unknown key; {did_you_mean(key, valid)}valid keys in {owner}: "
            f"{', '.join(valid)}"
        ) from None
    except ValidationError as e:
        raise ConfigError(f"{prefix}{e.full_key}: {_first_line(e.msg)}") from None


def _first_line(message: str) -> str:
    return str(message).strip().splitlines()[0]


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"{key}: no value given; set it on the command line, e.g. {key}=...")


def _resolve(cfg: DictConfig) -> None:
    try:
        OmegaConf.resolve(cfg)
    except (MissingMandatoryValue, ValidationError) as e:
        raise ConfigError(f"{e.full_key}: {_first_line(e.msg)}") from None

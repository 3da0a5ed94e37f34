"""Hydra plumbing: where the config tree is, sslrun's resolvers, lenient overrides, `compose`."""

import warnings
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _gpus_per_node(accelerator: str, devices: int) -> Optional[int]:
    """The GPUs a SLURM job asks for per node (conf/hydra/launcher/slurm.yaml): one per process
    unless the run trains on the CPU."""
    return None if accelerator == "cpu" else devices


def _quick_or(recipe: str, quick: str, other: str) -> str:
    """A method's preset per recipe (conf/method/*.yaml defaults lists): `quick` under
    recipe=quick, `other` (the paper's) under every other recipe."""
    return quick if recipe == "quick" else other


def _floordiv(value: int, divisor: int) -> int:
    """`${sslrun.floordiv:${data.image_size},4}`: sizes that follow the data (a 4 x 4 patch grid)."""
    return max(1, int(value) // int(divisor))


def register_hydra_extras() -> None:
    """What sslrun's configs need from Hydra in every process that composes them, submitit jobs
    included (they compose again when they start): the resolvers above, and silence about
    conf/hydra/launcher/submitit_local.yaml refining the plugin's option of the same name."""
    OmegaConf.register_new_resolver("sslrun.gpus_per_node", _gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("sslrun.quick_or", _quick_or, replace=True)
    OmegaConf.register_new_resolver("sslrun.floordiv", _floordiv, replace=True)
    warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_local' is validated against")


def lenient(override: str) -> str:
    """`key=value` -> `++key=value` for plain keys (not groups, not hydra.*): a misspelled key then
    reaches the schema check, which names the valid keys, instead of stopping Hydra with a
    multi-line struct error; and a dict value (`backbone.timm_kwargs={channels: [...]}`) may bring
    new keys."""
    key, sep, _ = override.partition("=")
    plain_key = sep and key and key[0] not in "+~" and not key.startswith("hydra")
    is_group = key in GROUPS or "/" in key or "@" in key
    return f"++{override}" if plain_key and not is_group else override


def compose(overrides=(), method_schema: bool = True) -> DictConfig:
    """The validated config of `python -m sslrun OVERRIDES...`, for the Python API and tests
    (method_schema: see `validate`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sslrun.config.validate import validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[lenient(o) for o in overrides])
    return validate(cfg, method_schema)

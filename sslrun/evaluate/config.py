"""The evaluation app's config: its tree (sslrun/conf_evaluate/: evaluate.yaml and the `protocol`
group), typed schemas with their checks, and the training config a protocol takes the backbone
and data from: the run's own (`.hydra/config.yaml`; `data.*` overrides apply), or with
`weights=FILE` the training groups given on the command line (`backbone=NAME data=NAME ...`,
composed and checked as training composes them). Light: omegaconf and Hydra only.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from sslrun.config import ConfigError, compose, lenient, merge_typed, register_hydra_extras
from sslrun.config.errors import did_you_mean, no_such_option, require, require_choice
from sslrun.config.schema import DATASETS, BackboneConfig, Schema, require_positive
from sslrun.run_dir import RunDir

EVAL_CONF_DIR = Path(__file__).resolve().parents[1] / "conf_evaluate"
PROTOCOLS = sorted(p.stem for p in (EVAL_CONF_DIR / "protocol").glob("*.yaml"))
TRAINING_GROUPS = ("backbone", "data")  # overrides of these go to the training config
BASELINES = ("pixels", "random_init")


def _crop_scale(node: DictConfig, prefix: str) -> None:
    low, high = (list(node.crop_scale) + [0, 0])[:2]
    require(len(node.crop_scale) == 2 and 0 < low <= high <= 1,
            f"{prefix}.crop_scale={list(node.crop_scale)}: give [low, high] with 0 < low <= high <= 1")


@dataclass
class KNNProtocol(Schema):
    name: str = MISSING
    k: List[int] = MISSING
    report_k: int = MISSING
    temperature: float = MISSING
    bank_size: Optional[int] = MISSING
    baselines: List[str] = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        p = cfg.protocol
        require_positive(p, "protocol", "k", "temperature")
        require(p.report_k in p.k, f"protocol.report_k={p.report_k}: must be one of protocol.k={list(p.k)}")
        require(p.bank_size is None or p.bank_size > 0, f"protocol.bank_size={p.bank_size}: positive, or null")
        for baseline in p.baselines:
            require_choice("protocol.baselines", baseline, BASELINES)


@dataclass
class LinearProtocol(Schema):
    name: str = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    momentum: float = MISSING
    lr: List[float] = MISSING
    weight_decay: List[float] = MISSING
    heldout_fraction: float = MISSING
    augment_passes: int = MISSING
    crop_scale: List[float] = MISSING
    threads: Optional[int] = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        p = cfg.protocol
        require_positive(p, "protocol", "epochs", "batch_size", "lr")
        require(p.threads is None or p.threads > 0, f"protocol.threads={p.threads}: positive, or null")
        require(len(p.weight_decay) > 0 and min(p.weight_decay) >= 0,
                f"protocol.weight_decay={list(p.weight_decay)}: give one or more values >= 0")
        require(0 < p.heldout_fraction < 1, f"protocol.heldout_fraction={p.heldout_fraction}: must be in (0, 1)")
        require(p.augment_passes >= 0, f"protocol.augment_passes={p.augment_passes}: must be at least 0")
        _crop_scale(p, "protocol")


@dataclass
class FinetuneProtocol(Schema):
    name: str = MISSING
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    batch_size: int = MISSING
    base_lr: float = MISSING
    weight_decay: float = MISSING
    layer_decay: float = MISSING
    warmup_epochs: float = MISSING
    label_smoothing: float = MISSING
    drop_path_rate: float = MISSING
    crop_scale: List[float] = MISSING
    baselines: List[str] = MISSING
    global_pool: Optional[str] = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        p = cfg.protocol
        require_positive(p, "protocol", "epochs", "batch_size", "base_lr")
        require(p.global_pool in (None, "token", "avg"),
                f"protocol.global_pool={p.global_pool}: one of token (the class token), avg (the patch tokens' "
                f"mean), or null (the backbone's own)")
        for baseline in p.baselines:
            require(baseline == "random_init", f"protocol.baselines: {baseline!r}; fine-tuning has one: random_init")
        require(p.max_steps is None or p.max_steps > 0, f"protocol.max_steps={p.max_steps}: positive, or null")
        require(0 < p.layer_decay <= 1, f"protocol.layer_decay={p.layer_decay}: must be in (0, 1] (1: none)")
        require(p.warmup_epochs >= 0, f"protocol.warmup_epochs={p.warmup_epochs}: must be at least 0")
        _crop_scale(p, "protocol")


@dataclass
class StatsProtocol(Schema):
    name: str = MISSING
    pairs: int = MISSING
    crop_scale: List[float] = MISSING
    alignment_alpha: float = MISSING
    uniformity_t: float = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        require_positive(cfg.protocol, "protocol", "pairs", "alignment_alpha", "uniformity_t")
        require(cfg.protocol.pairs >= 2, f"protocol.pairs={cfg.protocol.pairs}: needs at least 2 images")
        _crop_scale(cfg.protocol, "protocol")


PROTOCOL_SCHEMAS = {"knn": KNNProtocol, "linear": LinearProtocol, "finetune": FinetuneProtocol, "stats": StatsProtocol}
ACCELERATORS = ("auto", "cpu", "gpu")


@dataclass
class EvaluateConfig(Schema):
    run_dir: str = MISSING
    weights: Optional[str] = MISSING
    devices: int = MISSING
    accelerator: str = MISSING
    batch_size: int = MISSING
    num_workers: Optional[int] = MISSING
    seed: int = MISSING
    cache: bool = MISSING
    protocol: Any = field(default_factory=dict)

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        require_positive(cfg, "", "devices", "batch_size")
        require_choice("accelerator", cfg.accelerator, ACCELERATORS)
        require(cfg.num_workers is None or cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: at least 0, or null")


# ---------------------------------------------------------------------------- composing
def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def split_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the app's overrides, the training config's: backbone=, data=, backbone.*, data.*)."""
    training = [o for o in overrides if _key(o).split(".")[0] in TRAINING_GROUPS]
    return [o for o in overrides if o not in training], training


def app_lenient(override: str) -> str:
    """`lenient` (a misspelled key reaches the schema check), leaving the `protocol` group alone."""
    return override if override.partition("=")[0] == "protocol" else lenient(override)


def compose_app(overrides: Sequence[str] = (), run_dir: Optional[str] = None) -> DictConfig:
    """The validated config of `python -m sslrun.evaluate RUN_DIR OVERRIDES...` (the app's own
    overrides; the run directory as it is, whatever characters its path holds)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir=str(EVAL_CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="evaluate", overrides=[app_lenient(o) for o in overrides])
    except MissingConfigException as error:
        group, _, option = str(error.missing_cfg_file or "").rpartition("/")
        if group == "protocol":
            raise ConfigError(no_such_option("protocol", option, PROTOCOLS)) from None
        raise ConfigError(" ".join(str(error).split())) from None
    except HydraException as error:
        raise ConfigError(" ".join(str(error).split())) from None
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return validate_app(cfg)


def validate_app(cfg: DictConfig) -> DictConfig:
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    typed = merge_typed(EvaluateConfig, cfg, prefix="", label="the top level")
    name = cfg.protocol.get("name")
    require_choice("protocol.name", name, PROTOCOL_SCHEMAS)
    typed.protocol = merge_typed(PROTOCOL_SCHEMAS[name], cfg.protocol, prefix="protocol.", label=f"protocol ({name})")
    missing = sorted(OmegaConf.missing_keys(typed))
    if "run_dir" in missing:
        raise ConfigError("no run directory given: python -m sslrun.evaluate RUN_DIR protocol=knn|linear|finetune|stats")
    require(not missing, f"{missing[0] if missing else ''}: no value given; set it on the command line")
    for schema in (EvaluateConfig, PROTOCOL_SCHEMAS[name]):
        schema.check(typed)
    return typed


# ---------------------------------------------------------------------------- what is evaluated
def check_source(run_dir: str, weights: Optional[str], training_overrides: Sequence[str]) -> None:
    """The cheap checks of what is to be evaluated, each a one-line ConfigError."""
    layout = RunDir(run_dir)
    if weights is not None:
        require(Path(weights).is_file(), f"weights={weights}: no such file")
        require(any(_key(o) == "backbone" for o in training_overrides),
                f"weights={weights}: give the backbone it was trained as (and its data), e.g. "
                f"backbone=resnet18_half data=fashion_mnist: the training config groups")
        return
    require(layout.root.is_dir(), f"{run_dir}: no such directory (give a finished run's directory)")
    require(not any(_key(o).split(".")[0] == "backbone" for o in training_overrides),
            f"{run_dir}: a run is evaluated with its own backbone; to evaluate other weights give weights=FILE "
            f"backbone=NAME data=NAME")
    if not layout.backbone.is_file():
        summary = json.loads(layout.summary.read_text()) if layout.summary.is_file() else None
        if summary is None:
            raise ConfigError(f"{run_dir}: no backbone.safetensors and no summary.json: the run is still going or was "
                              f"killed; evaluate it once it has finished")
        raise ConfigError(f"{run_dir}: no backbone.safetensors: the run ended with status "
                          f"{summary.get('status', 'unknown')} ({summary.get('reason') or 'no reason given'}); "
                          f"evaluate a completed run")
    require(layout.config.is_file(), f"{run_dir}: no .hydra/config.yaml, so not a run directory sslrun wrote; give "
                                     f"weights={layout.backbone} backbone=NAME data=NAME instead")


def selects_groups(training_overrides: Sequence[str]) -> bool:
    """backbone=NAME or data=NAME among them: the training config must be composed."""
    return any(_key(o) in TRAINING_GROUPS for o in training_overrides)


def training_config(training_overrides: Sequence[str]) -> Optional[DictConfig]:
    """The training config the groups given compose to (checked as training checks it); None
    when no group is chosen. Composed outside of a running Hydra app (which composes only once)."""
    return compose(list(training_overrides), method_schema=False) if selects_groups(training_overrides) else None


def source_config(cfg: DictConfig, training_overrides: Sequence[str] = (),
                  composed: Optional[DictConfig] = None) -> DictConfig:
    """{backbone, data, method, weights}: what is evaluated, the backbone and data typed
    (`composed`: training_config(training_overrides), when it was composed already)."""
    check_source(cfg.run_dir, cfg.weights, training_overrides)
    composed = composed if composed is not None else training_config(training_overrides)
    if cfg.weights is not None:
        return OmegaConf.create({"backbone": composed.backbone, "data": composed.data, "method": None,
                                 "weights": str(cfg.weights)})
    layout = RunDir(cfg.run_dir)
    register_hydra_extras()
    run = OmegaConf.load(layout.config)
    # Resolved as the run resolved them, before any data override (a ViT's patch size follows data.image_size).
    node = OmegaConf.create(OmegaConf.to_container(OmegaConf.create({"backbone": run.backbone, "data": run.data}),
                                                   resolve=True))
    if composed is not None:  # data=NAME: another data set, as training composes it
        node.data = composed.data
    elif training_overrides:
        node.data = OmegaConf.merge(node.data, OmegaConf.from_dotlist([o.lstrip("+") for o in training_overrides]).data)
    name = node.data.get("name")
    require(name in DATASETS, f"data.name={name}: unknown data set; {did_you_mean(str(name), DATASETS)}"
                              f"choose one of: {', '.join(DATASETS)}")
    return OmegaConf.create({
        "backbone": merge_typed(BackboneConfig, node.backbone, prefix="backbone.", label="backbone"),
        "data": merge_typed(DATASETS[name], node.data, prefix="data.", label=f"data ({name})"),
        "method": run.method.name, "weights": str(layout.backbone)})

"""Typed schema of the composed config, and its validation.

Hydra composes `conf/` into one config. `validate` merges each group into the dataclass that
types it, so a misspelled key, a wrong type, a missing value or an inconsistent combination fails
before anything heavy starts, with one line that names the key and what is valid. The values
themselves live only in the YAML files: these classes carry types, never defaults.

This module imports nothing heavier than omegaconf, so that errors come back in a second.
"""

import difflib
import os
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, get_args

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError


CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _gpus_per_node(accelerator: str, devices: int) -> Optional[int]:
    """The GPUs a SLURM job asks for per node (conf/hydra/launcher/slurm.yaml): one per process
    unless the run trains on the CPU."""
    return None if accelerator == "cpu" else devices


def register_hydra_extras() -> None:
    """What sslrun's configs need from Hydra in every process that composes them, submitit jobs
    included (they compose again when they start): the resolver above, and silence about
    conf/hydra/launcher/submitit_local.yaml refining the plugin's option of the same name."""
    OmegaConf.register_new_resolver("sslrun.gpus_per_node", _gpus_per_node, replace=True)
    warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_local' is validated against")


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key and the fix."""


def lenient(override: str) -> str:
    """`key=value` -> `++key=value` for plain keys (not groups, not hydra.*): a misspelled key then
    reaches the schema check, which names the valid keys, instead of stopping Hydra with a
    multi-line struct error; and a dict value (`backbone.timm_kwargs={channels: [...]}`) may bring
    new keys."""
    key, sep, _ = override.partition("=")
    plain_key = sep and key and key[0] not in "+~" and not key.startswith("hydra")
    is_group = key in GROUPS or "/" in key or "@" in key
    return f"++{override}" if plain_key and not is_group else override


def compose(overrides=()) -> DictConfig:
    """The validated config of `python -m sslrun OVERRIDES...`, for the Python API and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[lenient(o) for o in overrides])
    return validate(cfg)


# ---------------------------------------------------------------------------- method
@dataclass
class MLPSpec:
    """Projector / predictor MLP (models.heads.MLPHead); hidden_dim None: the input's width."""

    num_layers: int = MISSING
    hidden_dim: Optional[int] = MISSING
    out_dim: int = MISSING
    batch_norm: bool = MISSING
    last_batch_norm: bool = MISSING


@dataclass
class SimCLRConfig:
    name: str = MISSING
    temperature: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class MoCoV2Config:
    name: str = MISSING
    temperature: float = MISSING
    momentum: float = MISSING
    queue_size: int = MISSING
    symmetric: bool = MISSING
    shuffle_bn: bool = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class MoCoV3Config:
    name: str = MISSING
    temperature: float = MISSING
    momentum: float = MISSING
    final_momentum: float = MISSING
    frozen_patch_embed: bool = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)
    predictor_mlp: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class BYOLConfig:
    name: str = MISSING
    momentum: float = MISSING
    final_momentum: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)
    predictor_mlp: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class SimSiamConfig:
    name: str = MISSING
    stop_gradient: bool = MISSING
    predictor: bool = MISSING
    fixed_predictor_lr: bool = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)
    predictor_mlp: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class BarlowTwinsConfig:
    name: str = MISSING
    lambd: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class VICRegConfig:
    name: str = MISSING
    invariance_weight: float = MISSING
    variance_weight: float = MISSING
    covariance_weight: float = MISSING
    eps: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@dataclass
class DINOHeadSpec:
    """models.heads.DINOHead: MLP to an l2-normalised bottleneck, weight-normalised prototypes."""

    num_layers: int = MISSING
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    out_dim: int = MISSING
    norm_last_layer: bool = MISSING
    batch_norm: bool = MISSING


@dataclass
class DINOConfig:
    name: str = MISSING
    global_crops: int = MISSING
    pack_crops: bool = MISSING
    student_temperature: float = MISSING
    teacher_temperature: float = MISSING
    warmup_teacher_temperature: float = MISSING
    warmup_teacher_temperature_epochs: float = MISSING
    center_momentum: float = MISSING
    momentum: float = MISSING
    final_momentum: float = MISSING
    freeze_last_layer_epochs: float = MISSING
    head: DINOHeadSpec = field(default_factory=DINOHeadSpec)


@dataclass
class IBOTConfig:
    loss_weight: float = MISSING
    mask_ratio: List[float] = MISSING
    mask_probability: float = MISSING
    separate_head: bool = MISSING
    head: DINOHeadSpec = field(default_factory=DINOHeadSpec)


@dataclass
class DINOv2Config(DINOConfig):
    centering: str = MISSING
    sinkhorn_iterations: int = MISSING
    dino_weight: float = MISSING
    koleo_weight: float = MISSING
    layerwise_lr_decay: float = MISSING
    patch_embed_lr_mult: float = MISSING
    ibot: IBOTConfig = field(default_factory=IBOTConfig)


@dataclass
class DINOv2DistillConfig(DINOv2Config):
    teacher_run: str = MISSING  # run directory of a trained method=dinov2 run


@dataclass
class TextTowerSpec:
    """models.text.TextTransformer: a causal transformer over CLIP's BPE tokens."""

    context_length: int = MISSING
    width: int = MISSING
    layers: int = MISSING
    heads: int = MISSING


@dataclass
class ImageTextConfig:
    """What CLIP and SigLIP share: the towers, the shared space, the learned scale, prompts."""

    name: str = MISSING
    embed_dim: int = MISSING
    logit_scale_init: float = MISSING
    max_logit_scale: float = MISSING
    micro_batches: int = MISSING
    text: TextTowerSpec = field(default_factory=TextTowerSpec)
    prompts: List[str] = MISSING


@dataclass
class CLIPConfig(ImageTextConfig):
    local_loss: bool = MISSING


@dataclass
class SigLIPConfig(ImageTextConfig):
    logit_bias_init: float = MISSING


METHODS: Dict[str, type] = {
    "simclr": SimCLRConfig,
    "mocov2": MoCoV2Config,
    "mocov3": MoCoV3Config,
    "byol": BYOLConfig,
    "simsiam": SimSiamConfig,
    "barlow_twins": BarlowTwinsConfig,
    "vicreg": VICRegConfig,
    "dino": DINOConfig,
    "dinov2": DINOv2Config,
    "dinov2_distill": DINOv2DistillConfig,
    "clip": CLIPConfig,
    "siglip": SigLIPConfig,
}


# ---------------------------------------------------------------------------- backbone
@dataclass
class BackboneConfig:
    name: str = MISSING
    small_stem: bool = MISSING
    drop_path_rate: float = MISSING
    timm_kwargs: Dict[str, Any] = MISSING
    attention: Optional[str] = MISSING  # ViTs: one of ATTENTION_BACKENDS; null for ResNets


ATTENTION_BACKENDS = ("auto", "xformers", "flex", "sdpa", "math")


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = MISSING
    download: bool = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING
    eval_crop_fraction: float = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    num_workers: Optional[int] = MISSING
    pin_memory: Optional[bool] = MISSING
    persistent_workers: bool = MISSING


@dataclass
class ImageFolderConfig(DataConfig):
    train_dir: str = MISSING
    val_dir: Optional[str] = MISSING


@dataclass
class STL10Config(DataConfig):
    train_split: str = MISSING


@dataclass
class CaptionFileConfig(DataConfig):
    train_file: str = MISSING
    val_file: Optional[str] = MISSING
    image_column: str = MISSING
    caption_column: str = MISSING


@dataclass
class ShardsConfig(DataConfig):
    train_shards: str = MISSING
    train_samples: int = MISSING
    shuffle_buffer: int = MISSING
    val_file: Optional[str] = MISSING
    image_column: str = MISSING
    caption_column: str = MISSING


DATASETS: Dict[str, type] = {
    "fashion_mnist": DataConfig,
    "mnist5k": DataConfig,
    "imagefolder": ImageFolderConfig,
    "cifar10": DataConfig,
    "cifar100": DataConfig,
    "stl10": STL10Config,
    "csv": CaptionFileConfig,
    "webdataset": ShardsConfig,
}


# ---------------------------------------------------------------------------- augmentation
@dataclass
class ColorJitterSpec:
    p: float = MISSING
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    hue: float = MISSING


@dataclass
class CropSpec:
    """`count` crops made with the same settings (multi-crop lists several specs)."""

    count: int = MISSING
    size: int = MISSING
    scale: List[float] = MISSING
    ratio: List[float] = MISSING
    flip_p: float = MISSING
    color_jitter: ColorJitterSpec = field(default_factory=ColorJitterSpec)
    grayscale_p: float = MISSING
    blur_p: float = MISSING
    blur_sigma: List[float] = MISSING
    solarize_p: float = MISSING


@dataclass
class AugmentationConfig:
    views: List[CropSpec] = MISSING


# ---------------------------------------------------------------------------- optimizer
@dataclass
class OptimizerBase:
    name: str = MISSING
    base_lr: float = MISSING
    lr_scaling: str = MISSING
    weight_decay: float = MISSING
    final_weight_decay: Optional[float] = MISSING
    exclude_bias_and_norm: bool = MISSING
    bias_and_norm_lr_scale: float = MISSING
    probe_lr: float = MISSING


@dataclass
class SGDConfig(OptimizerBase):
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class LARSConfig(OptimizerBase):
    momentum: float = MISSING
    trust_coefficient: float = MISSING


@dataclass
class AdamWConfig(OptimizerBase):
    betas: List[float] = MISSING
    eps: float = MISSING
    fused: bool = MISSING


OPTIMIZERS: Dict[str, type] = {"sgd": SGDConfig, "lars": LARSConfig, "adamw": AdamWConfig}
LR_SCALINGS = ("linear", "sqrt", "none")


# ---------------------------------------------------------------------------- scheduler
@dataclass
class WarmupCosineConfig:
    name: str = MISSING
    warmup_epochs: float = MISSING
    final_lr_ratio: float = MISSING


SCHEDULERS: Dict[str, type] = {"warmup_cosine": WarmupCosineConfig}


# ---------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    name: str = MISSING
    accelerator: str = MISSING
    devices: int = MISSING
    num_nodes: int = MISSING
    precision: str = MISSING
    max_epochs: int = MISSING
    max_steps: int = MISSING
    gradient_clip_val: Optional[float] = MISSING
    accumulate_grad_batches: int = MISSING
    sync_batchnorm: bool = MISSING
    log_every_n_steps: int = MISSING
    checkpoint_every_n_steps: int = MISSING
    keep_checkpoints: int = MISSING
    progress_bar: bool = MISSING
    requeue_signal: str = MISSING


@dataclass
class FSDPOptions:
    reshard_after_forward: bool = MISSING
    param_dtype: Optional[str] = MISSING
    cpu_offload: bool = MISSING
    activation_checkpointing: bool = MISSING


@dataclass
class FSDPTrainerConfig(TrainerConfig):
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)


TRAINERS: Dict[str, type] = {"single": TrainerConfig, "ddp": TrainerConfig, "fsdp": FSDPTrainerConfig}
FSDP_PARAM_DTYPES = ("bf16", "fp16")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


# ---------------------------------------------------------------------------- logger
@dataclass
class LoggerBase:
    name: str = MISSING


@dataclass
class WandbConfig(LoggerBase):
    project: str = MISSING
    entity: Optional[str] = MISSING
    offline: Optional[bool] = MISSING
    tags: List[str] = MISSING
    run_name: Optional[str] = MISSING
    group: Optional[str] = MISSING
    log_checkpoint: bool = MISSING


LOGGERS: Dict[str, type] = {"csv": LoggerBase, "tensorboard": LoggerBase, "wandb": WandbConfig}


# ---------------------------------------------------------------------------- top level
@dataclass
class KNNConfig:
    k: int = MISSING
    temperature: float = MISSING
    bank_size: Optional[int] = MISSING
    query_size: Optional[int] = MISSING


@dataclass
class EvalConfig:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear_probe: bool = MISSING
    pictures: int = MISSING


@dataclass
class RootConfig:
    seed: int = MISSING
    resume: Optional[str] = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: Any = MISSING
    backbone: Any = MISSING
    data: Any = MISSING
    augmentation: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING


# Group -> {option name: schema}; a group whose options share one schema maps None to it.
GROUP_SCHEMAS: Dict[str, Dict[Optional[str], type]] = {
    "method": METHODS,
    "backbone": {None: BackboneConfig},
    "data": DATASETS,
    "augmentation": {None: AugmentationConfig},
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "trainer": TRAINERS,
    "logger": LOGGERS,
}


def validate(cfg: DictConfig) -> DictConfig:
    """Return `cfg` merged into its typed schema, or raise ConfigError on the first problem."""
    cfg = cfg.copy()
    with _open(cfg):
        cfg.pop("hydra", None)
    typed = _merge(RootConfig, cfg, prefix="", label="the top level")
    for group, options in GROUP_SCHEMAS.items():
        node = cfg[group]
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{group}: expected a config group, got {node!r}")
        if None in options:
            schema = options[None]
        else:
            name = node.get("name")
            if name not in options:
                raise ConfigError(
                    f"{group}.name: unknown {group} {name!r}; choose one of: {', '.join(options)}"
                )
            schema = options[name]
        label = group if None in options else f"{group} ({node.name})"
        with _open(typed):
            typed[group] = _merge(schema, node, prefix=f"{group}.", label=label)
    _check_missing(typed)
    _check_values(typed)
    return typed


def teacher_run_files(run_dir) -> tuple:
    """(config, checkpoint) of a finished run: <run>/.hydra/config.yaml, <run>/checkpoints/last.ckpt."""
    run_dir = Path(run_dir)
    return run_dir / ".hydra" / "config.yaml", run_dir / "checkpoints" / "last.ckpt"


def _teacher_problem(cfg: DictConfig) -> str:
    """The problem with `method.teacher_run` for this student config, in one line, or ''."""
    config_path, checkpoint_path = teacher_run_files(cfg.method.teacher_run)
    where = f"method.teacher_run={cfg.method.teacher_run}"
    if not config_path.is_file() or not checkpoint_path.is_file():
        return (f"{where}: no finished run there (needs {config_path} and {checkpoint_path}); "
                f"point it at the run directory of a trained method=dinov2 run")
    teacher = OmegaConf.load(config_path)
    if teacher.method.name != "dinov2":
        return f"{where}: that run trained method={teacher.method.name}; the teacher must be a dinov2 run"
    checks = [
        ("backbone.timm_kwargs.patch_size", lambda c: c.backbone.timm_kwargs.get("patch_size")),
        ("data.image_size", lambda c: c.data.image_size),
        ("method.head.out_dim", lambda c: c.method.head.out_dim),
    ]
    for key, value in checks:
        if value(cfg) != value(teacher):
            return (f"{key}={value(cfg)}: the teacher at {cfg.method.teacher_run} has {value(teacher)}; "
                    f"set {key}={value(teacher)}")
    ibot = [(c.method.ibot.head if c.method.ibot.separate_head else c.method.head).out_dim for c in (cfg, teacher)]
    if ibot[0] != ibot[1]:
        return (f"method.ibot: the student's iBOT head has {ibot[0]} prototypes, the teacher's at "
                f"{cfg.method.teacher_run} {ibot[1]}; set method.ibot.separate_head=true "
                f"method.ibot.head.out_dim={ibot[1]}")
    return ""


def signal_number(name: str) -> Optional[int]:
    """`USR2` or `SIGUSR2` -> signal.SIGUSR2; None for a name that is no signal."""
    import signal

    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return found if isinstance(found, signal.Signals) else None


def world_size(cfg: DictConfig) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def global_batch_size(cfg: DictConfig) -> int:
    """Images per optimizer step over all processes: the batch the papers' lr rules refer to."""
    return cfg.data.batch_size * cfg.trainer.accumulate_grad_batches


def scaled_lr(cfg: DictConfig) -> float:
    """The papers' lr rule: base_lr * batch / 256 (linear) or base_lr * sqrt(batch) (sqrt)."""
    batch = global_batch_size(cfg)
    scaling = cfg.optimizer.lr_scaling
    factor = {"linear": batch / 256, "sqrt": batch**0.5, "none": 1.0}[scaling]
    return cfg.optimizer.base_lr * factor


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


def _merge(schema: type, node: DictConfig, prefix: str, label: str) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as e:
        path = str(e.full_key).split(".") if e.full_key else [str(e.key)]
        key = path[-1]
        parent = _schema_at(schema, [p for p in path[:-1] if not p.isdigit()])
        valid = _field_names(parent) if parent else []
        hint = difflib.get_close_matches(key, valid, n=1)
        did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
        owner = ".".join([label, *path[:-1]]) if path[:-1] else label
        raise ConfigError(
            f"{prefix}{'.'.join(path)}: unknown key; {did_you_mean}valid keys in {owner}: "
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_values(cfg: DictConfig) -> None:
    try:
        OmegaConf.resolve(cfg)
    except (MissingMandatoryValue, ValidationError) as e:
        raise ConfigError(f"{e.full_key}: {_first_line(e.msg)}") from None
    t, d, o = cfg.trainer, cfg.data, cfg.optimizer

    _require(t.accelerator in ACCELERATORS,
             f"trainer.accelerator={t.accelerator}: choose one of: {', '.join(ACCELERATORS)}")
    _require(t.precision in PRECISIONS,
             f"trainer.precision={t.precision}: choose one of: {', '.join(PRECISIONS)}")
    _require(t.devices >= 1, f"trainer.devices={t.devices}: must be at least 1")
    _require(t.num_nodes >= 1, f"trainer.num_nodes={t.num_nodes}: must be at least 1")
    _require(t.name != "single" or world_size(cfg) == 1,
             f"trainer.devices={t.devices} with trainer=single: one process only; "
             f"use trainer=ddp or trainer=fsdp for several devices")
    if t.name == "fsdp":
        _require(t.fsdp.param_dtype is None or t.fsdp.param_dtype in FSDP_PARAM_DTYPES,
                 f"trainer.fsdp.param_dtype={t.fsdp.param_dtype}: choose null (fp32) or one of: "
                 f"{', '.join(FSDP_PARAM_DTYPES)}")
    _require(t.max_epochs >= 1 or t.max_steps >= 1,
             "trainer.max_epochs / trainer.max_steps: set one of them to a positive number")
    _require(t.accumulate_grad_batches >= 1,
             f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: must be at least 1")
    _require(t.checkpoint_every_n_steps >= 1,
             f"trainer.checkpoint_every_n_steps={t.checkpoint_every_n_steps}: must be at least 1")
    _require(signal_number(t.requeue_signal) is not None,
             f"trainer.requeue_signal={t.requeue_signal}: not a signal; e.g. USR1, USR2, TERM")

    world = world_size(cfg)
    _require(d.batch_size >= 2 * world,
             f"data.batch_size={d.batch_size}: needs at least 2 images per process "
             f"({world} processes)")
    if d.batch_size % world:
        lower = d.batch_size - d.batch_size % world
        raise ConfigError(
            f"data.batch_size={d.batch_size}: the global batch must divide by the {world} "
            f"processes (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes}); "
            f"use e.g. data.batch_size={lower} or {lower + world}"
        )
    _require(d.eval_batch_size >= 1, f"data.eval_batch_size={d.eval_batch_size}: must be >= 1")
    _require(len(d.mean) == d.channels and len(d.std) == d.channels,
             f"data.mean / data.std: need {d.channels} values (data.channels={d.channels})")
    _require(0 < d.eval_crop_fraction <= 1,
             f"data.eval_crop_fraction={d.eval_crop_fraction}: must be in (0, 1]")
    _require(d.num_workers is None or d.num_workers >= 0,
             f"data.num_workers={d.num_workers}: must be >= 0 (or null for automatic)")

    _require(o.lr_scaling in LR_SCALINGS,
             f"optimizer.lr_scaling={o.lr_scaling}: choose one of: {', '.join(LR_SCALINGS)}")
    _require(o.base_lr > 0, f"optimizer.base_lr={o.base_lr}: must be positive")

    for i, view in enumerate(cfg.augmentation.views):
        key = f"augmentation.views.{i}"
        _require(view.count >= 1, f"{key}.count={view.count}: must be at least 1")
        _require(view.size >= 1, f"{key}.size={view.size}: must be at least 1")
        for name in ("scale", "ratio", "blur_sigma"):
            pair = view[name]
            _require(len(pair) == 2 and 0 < pair[0] <= pair[1],
                     f"{key}.{name}={list(pair)}: need [low, high] with 0 < low <= high")
        _require(view.scale[1] <= 1, f"{key}.scale={list(view.scale)}: high must be <= 1")
        probabilities = {"flip_p": view.flip_p, "grayscale_p": view.grayscale_p,
                         "blur_p": view.blur_p, "solarize_p": view.solarize_p,
                         "color_jitter.p": view.color_jitter.p}
        for name, p in probabilities.items():
            _require(0 <= p <= 1, f"{key}.{name}={p}: a probability must be in [0, 1]")

    m = cfg.method
    if "temperature" in m:
        _require(m.temperature > 0, f"method.temperature={m.temperature}: must be positive")
    for key in ("momentum", "final_momentum"):
        if key in m:
            _require(0 <= m[key] <= 1, f"method.{key}={m[key]}: a momentum must be in [0, 1]")
    if "queue_size" in m:
        _require(m.queue_size >= 1, f"method.queue_size={m.queue_size}: must be at least 1")
    for key in ("projector", "predictor_mlp"):
        if key in m:
            _require(m[key].num_layers >= 1, f"method.{key}.num_layers={m[key].num_layers}: must be at least 1")
    if "predictor_mlp" in m and "projector" in m:
        _require(m.predictor_mlp.out_dim == m.projector.out_dim,
                 f"method.predictor_mlp.out_dim={m.predictor_mlp.out_dim}: must equal method.projector.out_dim="
                 f"{m.projector.out_dim} (the prediction is compared with a projection)")

    if "global_crops" in m:
        sizes = [view.size for view in cfg.augmentation.views for _ in range(view.count)]
        _require(1 <= m.global_crops < len(sizes),
                 f"method.global_crops={m.global_crops}: must be at least 1 and fewer than the {len(sizes)} crops "
                 f"the augmentation makes")
        _require(len(set(sizes[:m.global_crops])) == 1,
                 f"method.global_crops={m.global_crops}: the first {m.global_crops} crops must share one size "
                 f"(augmentation sizes: {sizes}); list the global crops first")
    for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
        if key in m:
            _require(m[key] > 0, f"method.{key}={m[key]}: must be positive")
    if "centering" in m:
        _require(m.centering in ("sinkhorn_knopp", "center"),
                 f"method.centering={m.centering}: choose one of: sinkhorn_knopp, center")
        _require(len(m.ibot.mask_ratio) == 2 and 0 < m.ibot.mask_ratio[0] <= m.ibot.mask_ratio[1] < 1,
                 f"method.ibot.mask_ratio={list(m.ibot.mask_ratio)}: need [low, high] with 0 < low <= high < 1")
        _require(0 < m.ibot.mask_probability <= 1,
                 f"method.ibot.mask_probability={m.ibot.mask_probability}: must be in (0, 1]")
        _require(0 < m.layerwise_lr_decay <= 1,
                 f"method.layerwise_lr_decay={m.layerwise_lr_decay}: must be in (0, 1]")
    if "center_momentum" in m:
        _require(0 <= m.center_momentum <= 1, f"method.center_momentum={m.center_momentum}: must be in [0, 1]")
    patch = cfg.backbone.timm_kwargs.get("patch_size")
    if cfg.backbone.attention is not None and isinstance(patch, int):
        for i, view in enumerate(cfg.augmentation.views):
            _require(view.size % patch == 0,
                     f"augmentation.views.{i}.size={view.size}: must be a multiple of the ViT's patch size "
                     f"(backbone.timm_kwargs.patch_size={patch})")
    _require(cfg.backbone.attention is None or cfg.backbone.attention in ATTENTION_BACKENDS,
             f"backbone.attention={cfg.backbone.attention}: choose one of: {', '.join(ATTENTION_BACKENDS)}")

    if "text" in m:  # image-text methods
        _require(m.text.context_length >= 2, f"method.text.context_length={m.text.context_length}: must be at least 2 "
                 f"(start and end tokens)")
        _require(m.text.width % m.text.heads == 0,
                 f"method.text.width={m.text.width}: must divide by method.text.heads={m.text.heads}")
        _require(1 <= m.logit_scale_init <= m.max_logit_scale,
                 f"method.logit_scale_init={m.logit_scale_init}: must lie in [1, method.max_logit_scale="
                 f"{m.max_logit_scale}]")
        _require(len(m.prompts) > 0, "method.prompts: give at least one template, e.g. ['a photo of a {}.']")
        for prompt in m.prompts:
            _require(prompt.count("{}") == 1,
                     f"method.prompts: {prompt!r} must hold the class name's place '{{}}' exactly once")
        _require(t.accumulate_grad_batches == 1,
                 f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: averaging micro-batch losses drops "
                 f"negatives from method={m.name}'s loss; use method.micro_batches={t.accumulate_grad_batches} "
                 f"instead (the same loss as one big batch, less activation memory)")
        per_process = d.batch_size // world
        _require(m.micro_batches >= 1 and per_process % m.micro_batches == 0,
                 f"method.micro_batches={m.micro_batches}: must divide the {per_process} images per process "
                 f"(data.batch_size={d.batch_size} / {world} processes)")

    if "teacher_run" in m:
        problem = _teacher_problem(cfg)
        _require(not problem, problem)

    knn = cfg.eval.knn
    _require(knn.k >= 1, f"eval.knn.k={knn.k}: must be at least 1")
    _require(knn.temperature > 0, f"eval.knn.temperature={knn.temperature}: must be positive")
    _require(cfg.eval.pictures >= 0, f"eval.pictures={cfg.eval.pictures}: must be >= 0 (0: no pictures)")
    _require(cfg.eval.every_n_epochs >= 0,
             f"eval.every_n_epochs={cfg.eval.every_n_epochs}: must be >= 0 (0: only at the end)")
    if cfg.resume not in (None, "auto"):
        _require(os.path.isfile(cfg.resume),
                 f"resume={cfg.resume}: no such checkpoint file (use resume=auto or resume=null)")


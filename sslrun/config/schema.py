"""Typed schemas of every config group but `method` (each method's lives beside its class, in
sslrun/methods/), with the checks that belong to each.

The classes carry types, never defaults: the values live only in the YAML files. A schema's
`check(cfg)` gets the whole typed config (a check may need another group's values) and raises
ConfigError with one line that names the key and the fix.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from sslrun.config.errors import ConfigError, did_you_mean, require, require_choice


class Schema:
    """A group's schema: `check` sees the whole validated config. A nested spec (a dataclass field)
    may have `check_spec(node, key)` of its own: validation calls it wherever the spec is used."""

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Raise ConfigError on a value this group cannot take."""


def require_positive(node: DictConfig, prefix: str, *keys: str) -> None:
    """Each key's value, or every element of a (non-empty) list value, is positive; `prefix`
    names the node ("" for the top level)."""
    for key in keys:
        values = list(node[key]) if OmegaConf.is_list(node[key]) else [node[key]]
        name = f"{prefix}.{key}" if prefix else key
        require(len(values) > 0 and all(v > 0 for v in values), f"{name}={node[key]}: must be positive")


def require_unit_interval(node: DictConfig, prefix: str, *keys: str) -> None:
    for key in keys:
        require(0 <= node[key] <= 1, f"{prefix}.{key}={node[key]}: must be in [0, 1]")


# ---------------------------------------------------------------------------- shared by methods
@dataclass
class MLPSpec:
    """Projector / predictor MLP (models.heads.MLPHead); hidden_dim None: the input's width."""

    num_layers: int = MISSING
    hidden_dim: Optional[int] = MISSING
    out_dim: int = MISSING
    batch_norm: bool = MISSING
    last_batch_norm: bool = MISSING

    @staticmethod
    def check_spec(spec: DictConfig, key: str) -> None:
        require(spec.num_layers >= 1, f"{key}.num_layers={spec.num_layers}: must be at least 1")


@dataclass
class DINOHeadSpec:
    """models.heads.DINOHead: MLP to an l2-normalised bottleneck, weight-normalised prototypes
    (DINO, and iBOT's patch head in DINOv2)."""

    num_layers: int = MISSING
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    out_dim: int = MISSING
    norm_last_layer: bool = MISSING
    batch_norm: bool = MISSING


@dataclass
class TokenPredictorSpec:
    """models.predictor.TokenPredictor: MAE's decoder, I-JEPA's predictor (a narrow ViT)."""

    width: int = MISSING
    depth: int = MISSING
    heads: int = MISSING

    @staticmethod
    def check_spec(spec: DictConfig, key: str) -> None:
        require(spec.width > 0 and spec.depth > 0 and spec.heads > 0,
                f"{key}: width, depth and heads must be positive, got {spec.width}, {spec.depth}, {spec.heads}")
        require(spec.width % spec.heads == 0 and spec.width % 4 == 0,
                f"{key}.width={spec.width}: must be a multiple of 4 (the 2-D sin-cos positions) and of "
                f"{key}.heads={spec.heads}")


@dataclass
class PredictorHeads(Schema):
    """A projector and a predictor whose output is compared with a projection (BYOL, MoCo v3,
    SimSiam): the widths must match."""

    projector: MLPSpec = field(default_factory=MLPSpec)
    predictor_mlp: MLPSpec = field(default_factory=MLPSpec)

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        m = cfg.method
        require(m.predictor_mlp.out_dim == m.projector.out_dim,
                f"method.predictor_mlp.out_dim={m.predictor_mlp.out_dim}: must equal method.projector.out_dim="
                f"{m.projector.out_dim} (the prediction is compared with a projection)")


# ---------------------------------------------------------------------------- backbone
ATTENTION_BACKENDS = ("auto", "xformers", "flex", "sdpa", "math")


# timm.create_model arguments sslrun sets itself, and what to do instead.
SET_BY_SSLRUN = {"drop_path_rate": "set backbone.drop_path_rate instead",
                 "in_chans": "set by data.channels; remove it",
                 "num_classes": "sslrun builds the backbone without a classifier; remove it",
                 "pretrained": "sslrun downloads no weights; remove it"}


@dataclass
class BackboneConfig(Schema):
    name: str = MISSING
    small_stem: bool = MISSING
    drop_path_rate: float = MISSING
    timm_kwargs: Dict[str, Any] = MISSING
    attention: Optional[str] = MISSING  # ViTs: one of ATTENTION_BACKENDS; null for ResNets

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        b = cfg.backbone
        for key, fix in SET_BY_SSLRUN.items():
            require(key not in b.timm_kwargs, f"backbone.timm_kwargs.{key}: {fix}")
        if b.attention is not None:
            require_choice("backbone.attention", b.attention, ATTENTION_BACKENDS)
        patch = b.timm_kwargs.get("patch_size")
        if b.attention is not None and isinstance(patch, int):
            for i, view in enumerate(cfg.augmentation.views):
                require(view.size % patch == 0,
                        f"augmentation.views.{i}.size={view.size}: must be a multiple of the ViT's patch size "
                        f"(backbone.timm_kwargs.patch_size={patch})")


# ---------------------------------------------------------------------------- data
DECODERS = ("cpu", "device")  # where training images are decoded and cropped: loader workers, training device


@dataclass
class DataConfig(Schema):
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
    decode: str = MISSING  # one of DECODERS

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        from sslrun.config.validate import world_size

        d, t, world = cfg.data, cfg.trainer, world_size(cfg)
        require(d.batch_size >= 2 * world,
                f"data.batch_size={d.batch_size}: needs at least 2 images per process ({world} processes)")
        if d.batch_size % world:
            lower = d.batch_size - d.batch_size % world
            raise ConfigError(
                f"data.batch_size={d.batch_size}: the global batch must divide by the {world} "
                f"processes (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes}); "
                f"use e.g. data.batch_size={lower} or {lower + world}"
            )
        require(d.eval_batch_size >= 1, f"data.eval_batch_size={d.eval_batch_size}: must be >= 1")
        require(len(d.mean) == d.channels and len(d.std) == d.channels,
                f"data.mean / data.std: need {d.channels} values (data.channels={d.channels})")
        require(0 < d.eval_crop_fraction <= 1, f"data.eval_crop_fraction={d.eval_crop_fraction}: must be in (0, 1]")
        require(d.num_workers is None or d.num_workers >= 0,
                f"data.num_workers={d.num_workers}: must be >= 0 (or null for automatic)")
        require_choice("data.decode", d.decode, DECODERS)
        require(d.decode == "cpu" or d.name == "imagefolder",
                f"data.decode={d.decode}: only data=imagefolder decodes on the device (JPEG files); "
                f"data={d.name} needs data.decode=cpu")


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
class AugmentationConfig(Schema):
    views: List[CropSpec] = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        for i, view in enumerate(cfg.augmentation.views):
            key = f"augmentation.views.{i}"
            require(view.count >= 1, f"{key}.count={view.count}: must be at least 1")
            require(view.size >= 1, f"{key}.size={view.size}: must be at least 1")
            for name in ("scale", "ratio", "blur_sigma"):
                pair = view[name]
                require(len(pair) == 2 and 0 < pair[0] <= pair[1],
                        f"{key}.{name}={list(pair)}: need [low, high] with 0 < low <= high")
            require(view.scale[1] <= 1, f"{key}.scale={list(view.scale)}: high must be <= 1")
            probabilities = {"flip_p": view.flip_p, "grayscale_p": view.grayscale_p, "blur_p": view.blur_p,
                             "solarize_p": view.solarize_p, "color_jitter.p": view.color_jitter.p}
            for name, p in probabilities.items():
                require(0 <= p <= 1, f"{key}.{name}={p}: a probability must be in [0, 1]")


def crop_sizes(cfg: DictConfig) -> List[int]:
    """The size of every crop the augmentation makes, in order (global crops first)."""
    return [view.size for view in cfg.augmentation.views for _ in range(view.count)]


# ---------------------------------------------------------------------------- optimizer
LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass
class OptimizerBase(Schema):
    name: str = MISSING
    base_lr: float = MISSING
    lr_scaling: str = MISSING
    weight_decay: float = MISSING
    final_weight_decay: Optional[float] = MISSING
    exclude_bias_and_norm: bool = MISSING
    bias_and_norm_lr_scale: float = MISSING
    probe_lr: float = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        o = cfg.optimizer
        require_choice("optimizer.lr_scaling", o.lr_scaling, LR_SCALINGS)
        require(o.base_lr > 0, f"optimizer.base_lr={o.base_lr}: must be positive")


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


# ---------------------------------------------------------------------------- scheduler
@dataclass
class WarmupCosineConfig(Schema):
    name: str = MISSING
    warmup_epochs: float = MISSING
    final_lr_ratio: float = MISSING


SCHEDULERS: Dict[str, type] = {"warmup_cosine": WarmupCosineConfig}


# ---------------------------------------------------------------------------- trainer
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
NONFINITE_POLICIES = ("stop", "skip")  # callbacks/nonfinite.py
FSDP_PARAM_DTYPES = ("bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileOptions:
    """trainer.compile (distributed/compile.py)."""

    enabled: bool = MISSING
    backend: str = MISSING
    mode: str = MISSING


@dataclass
class TrainerConfig(Schema):
    name: str = MISSING
    accelerator: str = MISSING
    devices: int = MISSING
    num_nodes: int = MISSING
    precision: str = MISSING
    max_epochs: int = MISSING
    max_steps: int = MISSING
    gradient_clip_val: Optional[float] = MISSING
    nonfinite: str = MISSING
    max_skipped_steps: int = MISSING
    accumulate_grad_batches: int = MISSING
    sync_batchnorm: bool = MISSING
    log_every_n_steps: int = MISSING
    checkpoint_every_n_steps: int = MISSING
    keep_checkpoints: int = MISSING
    progress_bar: bool = MISSING
    requeue_signal: str = MISSING
    compile: CompileOptions = field(default_factory=CompileOptions)
    tf32: bool = MISSING
    channels_last: bool = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        from sslrun.config.validate import signal_number, world_size

        t = cfg.trainer
        require_choice("trainer.accelerator", t.accelerator, ACCELERATORS)
        require_choice("trainer.precision", t.precision, PRECISIONS)
        require(t.devices >= 1, f"trainer.devices={t.devices}: must be at least 1")
        require(t.num_nodes >= 1, f"trainer.num_nodes={t.num_nodes}: must be at least 1")
        require(t.name != "single" or world_size(cfg) == 1,
                f"trainer.devices={t.devices} with trainer=single: one process only; "
                f"use trainer=ddp or trainer=fsdp for several devices")
        require(t.max_epochs >= 1 or t.max_steps >= 1,
                "trainer.max_epochs / trainer.max_steps: set one of them to a positive number")
        for key in ("max_epochs", "max_steps"):
            require(t[key] >= -1, f"trainer.{key}={t[key]}: must be -1 (no limit) or at least 0")
        require(t.gradient_clip_val is None or t.gradient_clip_val > 0,
                f"trainer.gradient_clip_val={t.gradient_clip_val}: must be positive (the largest gradient norm), "
                f"or null for no clipping")
        require(t.keep_checkpoints >= -1,
                f"trainer.keep_checkpoints={t.keep_checkpoints}: must be -1 (all), 0 (last.ckpt only) or more")
        require(t.accumulate_grad_batches >= 1,
                f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: must be at least 1")
        require_choice("trainer.nonfinite", t.nonfinite, NONFINITE_POLICIES)
        require(t.max_skipped_steps >= 0, f"trainer.max_skipped_steps={t.max_skipped_steps}: must be at least 0")
        require(t.log_every_n_steps >= 1,
                f"trainer.log_every_n_steps={t.log_every_n_steps}: must be at least 1 (1: every step)")
        require(t.checkpoint_every_n_steps >= 1,
                f"trainer.checkpoint_every_n_steps={t.checkpoint_every_n_steps}: must be at least 1")
        require(signal_number(t.requeue_signal) is not None,
                f"trainer.requeue_signal={t.requeue_signal}: not a signal; e.g. USR1, USR2, TERM")
        require_choice("trainer.compile.mode", t.compile.mode, COMPILE_MODES)
        if t.compile.enabled:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            require(t.compile.backend in backends, f"trainer.compile.backend={t.compile.backend}: not a torch.compile "
                                                   f"backend here; {did_you_mean(t.compile.backend, backends)}"
                                                   f"choose one of: {', '.join(backends)}")


@dataclass
class FSDPOptions:
    reshard_after_forward: bool = MISSING
    param_dtype: Optional[str] = MISSING
    cpu_offload: bool = MISSING
    activation_checkpointing: bool = MISSING


@dataclass
class FSDPTrainerConfig(TrainerConfig):
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        super().check(cfg)
        dtype = cfg.trainer.fsdp.param_dtype
        require(dtype is None or dtype in FSDP_PARAM_DTYPES,
                f"trainer.fsdp.param_dtype={dtype}: choose null (fp32) or one of: {', '.join(FSDP_PARAM_DTYPES)}")


TRAINERS: Dict[str, type] = {"single": TrainerConfig, "ddp": TrainerConfig, "fsdp": FSDPTrainerConfig}


# ---------------------------------------------------------------------------- logger
@dataclass
class LoggerBase(Schema):
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
class RootConfig(Schema):
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

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        import os

        require(0 <= cfg.seed < 2**32, f"seed={cfg.seed}: must lie in [0, 2^32): numpy's seeds do")
        knn = cfg.eval.knn
        require(knn.k >= 1, f"eval.knn.k={knn.k}: must be at least 1")
        require(knn.temperature > 0, f"eval.knn.temperature={knn.temperature}: must be positive")
        require(cfg.eval.pictures >= 0, f"eval.pictures={cfg.eval.pictures}: must be >= 0 (0: no pictures)")
        require(cfg.eval.every_n_epochs >= 0,
                f"eval.every_n_epochs={cfg.eval.every_n_epochs}: must be >= 0 (0: only at the end)")
        if cfg.resume not in (None, "auto"):
            require(os.path.exists(cfg.resume),
                    f"resume={cfg.resume}: no such checkpoint (a file, or the directory of a sharded one); "
                    f"use resume=auto or resume=null")


# Group -> {option name: schema}; a group whose options share one schema maps None to it. The
# method group's schemas come from the method registry (sslrun.methods.registry).
GROUP_SCHEMAS: Dict[str, Dict[Optional[str], type]] = {
    "backbone": {None: BackboneConfig},
    "data": DATASETS,
    "augmentation": {None: AugmentationConfig},
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "trainer": TRAINERS,
    "logger": LOGGERS,
}

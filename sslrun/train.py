"""One training run: build every piece from the validated config, train, write summary.json.

    run(cfg)  ->  build_data -> build_method -> build_callbacks -> build_trainer -> fit -> summarize

This and `__main__` are the only modules that read the whole config; everything below them gets
the part it needs.
"""

import json
import logging
import os
import resource
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sslrun import tracking
from sslrun.callbacks import (CollapseMonitor, ImageTextEvaluation, NonFiniteGuard, OnlineEvaluation, Pictures,
                              StepCheckpoints, Throughput)
from sslrun.config import ConfigError, signal_number, world_size
from sslrun.data.datamodule import Captions, SSLDataModule, Splits
from sslrun.data.datasets import Shards
from sslrun.data.tokenizer import Tokenizer
from sslrun.distributed import convert_to_global_bn
from sslrun.distributed.checkpoint import (AtomicCheckpointIO, AtomicShardedStrategy, full_state_dict,
                                           is_complete_sharded_checkpoint, tensor_bytes)
from sslrun.distributed.compile import compile_method, on_cuda, require_visible_gpu, set_tf32, use_channels_last
from sslrun.distributed.safe_load import check_checkpoint, pickle_parses
from sslrun.failures import Diverged, RunFailure, write_failed
from sslrun.launch.requeue import Requeue, check_requeue_signal
from sslrun.launch.threads import cpu_threads
from sslrun.methods.registry import registered
from sslrun.models.backbones import build_backbone
from sslrun.models.vit import is_vit
from sslrun.optim import WarmupCosine
from sslrun.redaction import redact
from sslrun.run_dir import STEP_CHECKPOINT, RunDir, step_of

log = logging.getLogger("sslrun")


@dataclass
class Data:
    """The data side of a run and what is sized from it."""

    module: SSLDataModule
    splits: Splits
    lr_schedule: WarmupCosine
    steps_per_epoch: int
    evaluate: bool  # online kNN / probe: a held-out split with labels


@dataclass
class Callbacks:
    """The run's own callbacks; those a run does not use are None."""

    evaluation: Optional[OnlineEvaluation]
    image_text_evaluation: Optional[ImageTextEvaluation]
    pictures: Optional[Pictures]
    collapse: CollapseMonitor
    nonfinite: NonFiniteGuard
    throughput: Throughput
    checkpoints: StepCheckpoints
    requeue: Optional[Requeue]

    def all(self) -> List[L.Callback]:
        return [c for c in vars(self).values() if c is not None]


@dataclass
class Run:
    """Everything a finished run reports on (summary.json)."""

    cfg: DictConfig
    layout: RunDir
    name: str
    data: Data
    method: L.LightningModule
    callbacks: Callbacks
    trainer: L.Trainer
    started: float


def run(cfg: DictConfig, run_dir: Optional[str] = None, callbacks: Iterable[L.Callback] = ()) -> dict:
    """Train as `cfg` says (already validated) and return the summary (also in summary.json).

    run_dir defaults to Hydra's output directory; `callbacks` are added to the trainer's own.
    A run that stops early still writes summary.json (status and reason) where the disk allows,
    and raises RunFailure with the one line to show, or the error itself if it is a bug."""
    started = time.time()
    layout = RunDir(Path(run_dir or _hydra_run_dir()).absolute())
    progress = _Progress()
    try:
        return _train(cfg, layout, list(callbacks), progress, started)
    except RunFailure as failure:
        if isinstance(failure, Diverged):
            failure = Diverged(f"{failure}; last good checkpoint: {_last_good_checkpoint(layout, progress)}; "
                               f"lower optimizer.base_lr or set trainer.gradient_clip_val")
        _write_stopped_summary(cfg, layout, progress, failure.status, str(failure), started)
        raise failure from None
    except SystemExit as exit:
        if progress.callbacks is None or progress.callbacks.requeue is None or not progress.callbacks.requeue.checkpointed:
            _write_stopped_summary(cfg, layout, progress, "failed", f"interrupted (exit code {exit.code})", started)
        raise  # a requeue hand-over wrote status preempted before it exited
    except ConfigError as error:
        error = _without_worker_traceback(error)
        _write_stopped_summary(cfg, layout, progress, "failed", str(error), started)
        raise error from None
    except BaseException as error:
        _write_stopped_summary(cfg, layout, progress, "failed", _first_line(error), started)
        raise


@dataclass
class _Progress:
    """What a run has built so far: what a summary of a run that stopped early can report."""

    callbacks: Optional["Callbacks"] = None
    trainer: Optional[L.Trainer] = None


def _train(cfg: DictConfig, layout: RunDir, callbacks: List[L.Callback], progress: _Progress, started: float) -> dict:
    _tidy_lightning_output()
    cpu_threads(cfg.trainer.devices)
    require_visible_gpu(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data = build_data(cfg)
    method = build_method(cfg, data.lr_schedule, data.splits.num_classes if data.evaluate and cfg.eval.linear_probe
                          else None, data.steps_per_epoch)
    data.module.sample_masks = method.sample_masks
    own = progress.callbacks = build_callbacks(cfg, layout, data, method)
    resume_from = resume_path(cfg, layout)
    overrides, sweep_dir = tracking.hydra_job()
    name = tracking.run_name(cfg.method.name, cfg.backbone.name, cfg.data.name, overrides)
    trainer = progress.trainer = build_trainer(
        cfg, layout, [*own.all(), *callbacks],
        tracking.build_logger(cfg.logger, layout.root, name, sweep_dir, OmegaConf.to_container(cfg, resolve=True),
                              resuming=resume_from is not None))
    if trainer.is_global_zero:
        _log_start(cfg, layout, data, method)
    # Our checkpoints hold only tensors and plain containers (distributed/safe_load.py).
    trainer.fit(method, datamodule=data.module, ckpt_path=resume_from, weights_only=True)
    # The final state, final evaluation included (ModelCheckpoint saves only on its step grid).
    trainer.save_checkpoint(str(layout.last_checkpoint), weights_only=False)
    export_backbone(cfg, method.eval_backbone, layout.backbone, trainer.is_global_zero)
    return summarize(Run(cfg, layout, name, data, method, own, trainer, started))


# ---------------------------------------------------------------------------- build steps
def build_data(cfg: DictConfig) -> Data:
    """The data module (captioned for image-text methods), its splits, and the schedules' length."""
    spec = registered()[cfg.method.name]
    captions = Captions(Tokenizer(cfg.method.text.context_length), list(cfg.method.prompts)) if spec.image_text else None
    module = SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, processes=world_size(cfg),
                           processes_per_node=cfg.trainer.devices, seed=cfg.seed, captions=captions,
                           upscaled=spec.cls.upscaled_crops(cfg.method))
    splits = module.load()
    schedule, steps_per_epoch = lr_schedule(cfg, len(splits.train))
    evaluate = cfg.eval.enabled and splits.heldout is not None and splits.num_classes > 0
    return Data(module, splits, schedule, steps_per_epoch, evaluate)


def build_method(cfg: DictConfig, lr_schedule: WarmupCosine, num_classes: Optional[int],
                 steps_per_epoch: int) -> L.LightningModule:
    """The method `cfg.method.name` names, on its backbone, with global BN, and compiled, TF32 and
    channels-last (on CUDA) as `cfg.trainer` asks.

    `steps_per_epoch` turns the schedules given in epochs (DINO's) into steps."""
    method = registered()[cfg.method.name].cls(
        cfg.method,
        backbone=build_backbone(cfg.backbone, in_chans=cfg.data.channels),
        optimizer_cfg=cfg.optimizer,
        lr_schedule=lr_schedule,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        config=OmegaConf.to_container(cfg, resolve=True),
        sharding=OmegaConf.to_container(cfg.trainer.fsdp) if cfg.trainer.name == "fsdp" else None,
    )
    if cfg.trainer.sync_batchnorm and world_size(cfg) > 1:
        convert_to_global_bn(method)
    if on_cuda(cfg.trainer.accelerator):
        set_tf32(cfg.trainer.tf32)
        if cfg.trainer.channels_last:
            use_channels_last(method)
    if cfg.trainer.compile.enabled:
        compile_method(method, cfg.trainer.compile.backend, cfg.trainer.compile.mode)
    return method


def build_callbacks(cfg: DictConfig, layout: RunDir, data: Data, method: L.LightningModule) -> Callbacks:
    splits, every = data.splits, cfg.eval.every_n_epochs
    image_text = registered()[cfg.method.name].image_text
    has_images_to_draw = splits.heldout is not None or not isinstance(splits.train, Shards)
    requeue = None
    # Under SLURM one handler checkpoints and requeues on the warning signal (launch/requeue.py),
    # so Lightning's own SIGUSR1 requeue stays off (build_trainer).
    if SLURMEnvironment.detect():
        check_requeue_signal(cfg.trainer.requeue_signal)
        requeue = Requeue(signal_number(cfg.trainer.requeue_signal), layout.last_checkpoint,
                          on_preempted=lambda trainer, reason: _write_summary(layout, {
                              **_identity(cfg), "status": "preempted", "reason": reason,
                              "global_step": trainer.global_step, "checkpoint": str(layout.last_checkpoint)}))
    guard = NonFiniteGuard(cfg.trainer.nonfinite, cfg.trainer.max_skipped_steps,
                           check_gradients=cfg.trainer.precision != "16-mixed")
    return Callbacks(
        evaluation=OnlineEvaluation(data.module, cfg.eval.knn, every, splits.num_classes) if data.evaluate else None,
        image_text_evaluation=(ImageTextEvaluation(data.module, splits.class_names, every)
                               if image_text and cfg.eval.enabled and splits.heldout is not None else None),
        pictures=(Pictures(data.module, layout.pictures, every, cfg.eval.pictures)
                  if cfg.eval.pictures and is_vit(method.backbone) and has_images_to_draw else None),
        collapse=CollapseMonitor(cfg.trainer.log_every_n_steps),
        nonfinite=guard,
        throughput=Throughput(cfg.data.batch_size, cfg.trainer.precision,
                              OmegaConf.select(cfg, "trainer.fsdp.param_dtype")),
        checkpoints=StepCheckpoints(
            guard.pause_checkpoints,
            dirpath=layout.checkpoints,
            filename=STEP_CHECKPOINT,
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
            monitor="step",
            mode="max",
            save_top_k=cfg.trainer.keep_checkpoints,
            save_last=True,
        ),
        requeue=requeue,
    )


def build_trainer(cfg: DictConfig, layout: RunDir, callbacks: List[L.Callback], logger) -> L.Trainer:
    t = cfg.trainer
    on_slurm = SLURMEnvironment.detect()
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg),
        precision=t.precision,
        max_epochs=t.max_epochs if t.max_steps <= 0 else -1,
        max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if on_slurm else [])],
        default_root_dir=str(layout.root),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the data module shards the data itself (GlobalBatchSampler)
    )


def _strategy(cfg: DictConfig):
    if cfg.trainer.name == "single":
        return "auto"
    if cfg.trainer.name == "fsdp":  # the method shards itself in configure_model
        return AtomicShardedStrategy(data_parallel_size=world_size(cfg), tensor_parallel_size=1)
    return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


# ---------------------------------------------------------------------------- learning rate
def global_batch_size(cfg: DictConfig) -> int:
    """Images per optimizer step over all processes: the batch the papers' lr rules refer to."""
    return cfg.data.batch_size * cfg.trainer.accumulate_grad_batches


def scaled_lr(cfg: DictConfig) -> float:
    """The papers' lr rule: base_lr * batch / 256 (linear) or base_lr * sqrt(batch) (sqrt)."""
    batch = global_batch_size(cfg)
    factor = {"linear": batch / 256, "sqrt": batch**0.5, "none": 1.0}[cfg.optimizer.lr_scaling]
    return cfg.optimizer.base_lr * factor


def lr_rule(cfg: DictConfig) -> str:
    o, batch = cfg.optimizer, global_batch_size(cfg)
    rule = {"linear": f"{o.base_lr} x {batch}/256", "sqrt": f"{o.base_lr} x sqrt({batch})", "none": f"{o.base_lr}"}
    return f"{rule[o.lr_scaling]} = {scaled_lr(cfg):.6g}"


def lr_schedule(cfg: DictConfig, train_size: int):
    """The per-step learning rate, sized from the data set, batch and training length."""
    batches = train_size // cfg.data.batch_size  # GlobalBatchSampler: full global batches only
    steps_per_epoch = batches // cfg.trainer.accumulate_grad_batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}: larger than the training split ({train_size} "
            f"images) allows for one full step; lower it"
        )
    total = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else cfg.trainer.max_epochs * steps_per_epoch
    peak = scaled_lr(cfg)
    warmup = min(total, round(cfg.scheduler.warmup_epochs * steps_per_epoch))
    return WarmupCosine(peak=peak, total_steps=total, warmup_steps=warmup,
                        final=peak * cfg.scheduler.final_lr_ratio), steps_per_epoch


# ---------------------------------------------------------------------------- checkpoints, export
def resume_path(cfg: DictConfig, layout: RunDir) -> Optional[str]:
    """resume=auto picks <run dir>/checkpoints/last.ckpt, or the newest intact step checkpoint;
    resume=PATH that checkpoint. A checkpoint is a file (single process, DDP) or a directory of
    shards (trainer=fsdp, which resumes on any number of processes). One that pickles anything
    sslrun never writes is refused, also under resume=auto: that is no accident to skip silently."""
    path = None if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto":
        for candidate in filter(Path.exists, [layout.last_checkpoint, *layout.step_checkpoints()]):
            if is_intact(candidate):
                path = str(candidate)
                break
            log.warning("ignoring unreadable checkpoint %s", candidate)
    elif path is not None and not is_intact(Path(path)):
        raise ConfigError(f"resume={path}: not a complete checkpoint (a checkpoint file, or a sharded checkpoint "
                          f"directory with .metadata and meta.pt); use resume=auto to take the newest intact one")
    if path is None:
        return None
    if Path(path).is_dir() and cfg.trainer.name != "fsdp":
        raise ConfigError(f"resume: {path} is a sharded checkpoint (a directory, written under trainer=fsdp); "
                          f"resume it with trainer=fsdp, on any number of devices")
    try:
        check_checkpoint(path)
    except ConfigError as error:
        if cfg.resume != "auto":
            raise ConfigError(f"resume: {error}") from None
        raise ConfigError(f"resume=auto: {error}; move it away to resume from the one before it, or resume=null "
                          f"to start afresh") from None
    log.info("resuming from %s", path)
    return path


def is_intact(path: Path) -> bool:
    """A whole checkpoint: a file whose zip and pickle read to the end, or a sharded directory
    with its index and meta.pt. (Whether it is safe to load is check_checkpoint's question.)"""
    if path.is_file():
        return zipfile.is_zipfile(path) and pickle_parses(path)
    return is_complete_sharded_checkpoint(path) and pickle_parses(path / "meta.pt")


def export_backbone(cfg: DictConfig, backbone: torch.nn.Module, path: Path, is_writer: bool) -> None:
    """The evaluated backbone's whole state dict as safetensors, with what timm needs to build the
    model it loads into (`timm.create_model(**json.loads(metadata["timm_create_model"]))`).
    Collective: every process calls it; process 0 writes."""
    from safetensors.torch import save_file

    state = full_state_dict(backbone)
    if not is_writer:
        return
    create = {"model_name": cfg.backbone.name, "num_classes": 0, "in_chans": cfg.data.channels,
              **OmegaConf.to_container(cfg.backbone.timm_kwargs, resolve=True)}
    metadata = {"timm_create_model": json.dumps(create), "small_stem": json.dumps(bool(cfg.backbone.small_stem)),
                "method": cfg.method.name}
    partial = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=metadata)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise write_failed(path, error, tensor_bytes(state)) from None
    log.info("backbone weights: %s", path)


# ---------------------------------------------------------------------------- summary
def summarize(run: Run) -> dict:
    """The run's results (design notes: summary.json), written by process 0. Collective: every
    process must call it."""
    cfg, trainer, method, own = run.cfg, run.trainer, run.method, run.callbacks
    final_loss = method.epoch_loss.compute().item() if method.epoch_loss.update_count else float("nan")
    device = trainer.strategy.root_device  # the training device (Lightning moves a single-device model back to CPU)
    skipped = torch.tensor([run.data.module.skipped_images()], dtype=torch.long)
    skipped = int(trainer.strategy.reduce(skipped.to(device), reduce_op="max").item())
    results = own.evaluation.results if own.evaluation is not None else {}
    if device.type == "cuda":
        peak = {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "cuda max allocated, process 0"}
    else:
        peak = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_memory_kind": "cpu max resident set, process 0"}
    layout = run.layout
    summary = {
        **_identity(cfg),
        "status": "completed",
        "reason": None,
        "global_step": trainer.global_step,
        "epochs": round(trainer.global_step / run.data.steps_per_epoch, 3),
        "train_loss": final_loss,
        "train_loss_protocol": "mean training loss over the last epoch, all processes",
        "knn_top1": results.get("knn_top1"),
        "knn_top1_random_init": results.get("knn_top1_random_init"),
        "knn_top1_pixels": results.get("knn_top1_pixels"),
        "linear_probe_top1": results.get("linear_probe_top1"),
        "knn_history": own.evaluation.history if own.evaluation is not None else [],
        "eval_protocol": own.evaluation.protocol() if own.evaluation is not None else "no online evaluation",
        "images_per_sec": own.throughput.images_per_sec,
        **own.throughput.summary(),  # flops_per_step, tflops_per_sec, mfu, peak_tflops, mfu_protocol
        **peak,
        "wall_time_sec": time.time() - run.started,
        "world_size": trainer.world_size,
        "global_batch_size": global_batch_size(cfg),
        "lr": scaled_lr(cfg),
        "lr_rule": lr_rule(cfg),
        "skipped_images": skipped,
        "skipped_steps": own.nonfinite.skipped_steps,
        "checkpoint": str(layout.last_checkpoint) if layout.last_checkpoint.exists() else None,
        "backbone_weights": str(layout.backbone) if layout.backbone.is_file() else None,
    }
    if own.image_text_evaluation is not None:
        summary.update(own.image_text_evaluation.results)
        summary["image_text_eval_protocol"] = own.image_text_evaluation.protocol()
    summary.update(own.collapse.summary())
    summary["run_name"] = run.name
    if trainer.is_global_zero and cfg.logger.name == "wandb" and cfg.logger.log_checkpoint:
        tracking.log_checkpoint_artifact(trainer.logger, [layout.last_checkpoint, layout.backbone],
                                         name=f"model-{trainer.logger.version}")
    if trainer.is_global_zero:
        _write_summary(layout, summary)
    return summary


def _identity(cfg: DictConfig) -> dict:
    return {"method": cfg.method.name, "backbone": cfg.backbone.name, "data": cfg.data.name}


def _write_stopped_summary(cfg: DictConfig, layout: RunDir, progress: _Progress, status: str, reason: str,
                           started: float) -> None:
    """summary.json of a run that stopped early, by process 0 alone (the others may be gone): no
    collectives, only what is known here."""
    trainer, own = progress.trainer, progress.callbacks
    if not rank_zero_only.rank == 0:
        return
    summary = {**_identity(cfg), "status": status, "reason": reason,
               "global_step": trainer.global_step if trainer is not None else 0,
               "skipped_steps": own.nonfinite.skipped_steps if own is not None else 0,
               **(own.evaluation.results if own is not None and own.evaluation is not None else {}),
               "wall_time_sec": time.time() - started,
               "checkpoint": _last_good_checkpoint(layout, progress, absolute=True)}
    _write_summary(layout, summary)


def _write_summary(layout: RunDir, summary: dict) -> None:
    """Atomically, so a full disk leaves the previous summary.json (if any) whole."""
    partial = layout.summary.with_name(layout.summary.name + ".tmp")
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(redact(summary), indent=2) + "\n")
        os.replace(partial, layout.summary)
    except OSError as error:
        partial.unlink(missing_ok=True)
        log.error("could not write %s: %s", layout.summary, error.strerror or error)
        return
    log.info("run %s; summary: %s", summary["status"], layout.summary)


def _last_good_checkpoint(layout: RunDir, progress: _Progress, absolute: bool = False) -> Optional[str]:
    """The checkpoint resume=auto would continue from; after non-finite steps the newest step
    checkpoint from before them. Relative to the run dir, or absolute."""
    own = progress.callbacks
    unstable_since = own.nonfinite.unstable_since if own is not None else None
    candidates = [layout.last_checkpoint, *layout.step_checkpoints()] if unstable_since is None else \
        [p for p in layout.step_checkpoints() if step_of(p) < unstable_since]
    for candidate in filter(Path.exists, candidates):
        if is_intact(candidate):
            return str(candidate if absolute else candidate.relative_to(layout.root))
    return None if absolute else "none yet"


def _without_worker_traceback(error: ConfigError) -> ConfigError:
    """A DataError raised in a DataLoader worker arrives with the worker's traceback in its
    message (torch re-raises it so); its last line is the one to show."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return error
    last = text.splitlines()[-1]
    return type(error)(last.split(": ", 1)[1] if ": " in last else last)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ---------------------------------------------------------------------------- logging
def _log_start(cfg: DictConfig, layout: RunDir, data: Data, method: L.LightningModule) -> None:
    log.info(
        "run dir %s | %s on %s | global batch %d = %d per process x %d processes x %d accumulation "
        "| lr = %s | %d steps per epoch, %d steps",
        layout.root, cfg.method.name, cfg.data.name, global_batch_size(cfg), data.module.per_process_batch,
        world_size(cfg), cfg.trainer.accumulate_grad_batches, lr_rule(cfg), data.steps_per_epoch,
        data.lr_schedule.total_steps,
    )
    if is_vit(method.backbone):
        patch = method.backbone.patch_embed.patch_size[0]
        sizes = sorted({view.size for view in cfg.augmentation.views}, reverse=True)
        grids = ", ".join(f"{(s // patch) ** 2} per {s} px crop" for s in sizes)
        log.info("backbone %s: %d px patches, tokens: %s (backbone.timm_kwargs.patch_size=N to change)",
                 cfg.backbone.name, patch, grids)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _tidy_lightning_output() -> None:
    """One copy of each Lightning message (its own console handlers duplicate the root's under
    Hydra), no advertisements, no deprecation noise from Lightning's internals."""
    root = logging.getLogger()
    lightning_loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    if root.hasHandlers():
        for logger in lightning_loggers:
            logger.handlers.clear()
            logger.propagate = True
    for logger in (root, *lightning_loggers):
        for handler in logger.handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Backbones return views (timm's pooling); nothing here changes a model output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # The data module's own state resumes the data mid-epoch; Lightning only checks the loader.
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    # sslrun starts its processes itself; srun is only for runs on SLURM, which Lightning detects.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir

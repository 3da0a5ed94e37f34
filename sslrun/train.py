"""One training run: build every piece from the validated config, train, write summary.json.

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
from pathlib import Path
from typing import Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from sslrun import config as config_lib
from sslrun import tracking
from sslrun.callbacks import (AtomicCheckpointIO, CollapseMonitor, ImageTextEvaluation, OnlineEvaluation, Pictures,
                              Requeue, Throughput)
from sslrun.config import ConfigError
from sslrun.data.datamodule import Captions, SSLDataModule
from sslrun.data.datasets import Shards
from sslrun.data.tokenizer import Tokenizer
from sslrun.distributed import convert_to_global_bn
from sslrun.distributed.checkpoint import AtomicShardedStrategy, full_state_dict, is_complete_sharded_checkpoint
from sslrun.methods import METHODS
from sslrun.models.backbones import build_backbone
from sslrun.models.vit import is_vit
from sslrun.optim import WarmupCosine

log = logging.getLogger("sslrun")


def run(cfg: DictConfig, run_dir: Optional[str] = None, callbacks: Iterable[L.Callback] = ()) -> dict:
    """Train as `cfg` says (already validated) and return the summary (also in summary.json).

    run_dir defaults to Hydra's output directory; `callbacks` are added to the trainer's own."""
    started = time.time()
    _tidy_lightning_output()
    _cpu_threads(cfg.trainer.devices)
    run_dir = Path(run_dir or _hydra_run_dir()).absolute()
    world = config_lib.world_size(cfg)
    method_cls = METHODS[cfg.method.name]
    views = sum(view.count for view in cfg.augmentation.views)
    if method_cls.num_views is not None and views != method_cls.num_views:
        raise ConfigError(
            f"augmentation: method={cfg.method.name} takes {method_cls.num_views} views, the recipe "
            f"makes {views} (sum of augmentation.views[*].count)"
        )
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu: no CUDA device is visible here; use "
                          "trainer.accelerator=cpu or auto")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    captions = (Captions(Tokenizer(cfg.method.text.context_length), list(cfg.method.prompts))
                if getattr(method_cls, "image_text", False) else None)
    datamodule = SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, processes=world,
                               processes_per_node=cfg.trainer.devices, seed=cfg.seed, captions=captions)
    splits = datamodule.load()
    schedule, steps_per_epoch = lr_schedule(cfg, len(splits.train))
    evaluate = cfg.eval.enabled and splits.heldout is not None and splits.num_classes > 0
    method = build_method(cfg, schedule, splits.num_classes if evaluate and cfg.eval.linear_probe else None,
                          steps_per_epoch)

    evaluation = (
        OnlineEvaluation(datamodule, cfg.eval.knn, cfg.eval.every_n_epochs, splits.num_classes)
        if evaluate else None
    )
    image_text_evaluation = (
        ImageTextEvaluation(datamodule, splits.class_names, cfg.eval.every_n_epochs)
        if captions is not None and cfg.eval.enabled and splits.heldout is not None else None
    )
    has_images_to_draw = splits.heldout is not None or not isinstance(splits.train, Shards)
    pictures = (Pictures(datamodule, run_dir / "pictures", cfg.eval.every_n_epochs, cfg.eval.pictures)
                if cfg.eval.pictures and is_vit(method.backbone) and has_images_to_draw else None)
    throughput = Throughput(cfg.data.batch_size)
    collapse = CollapseMonitor()
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
        monitor="step",
        mode="max",
        save_top_k=cfg.trainer.keep_checkpoints,
        save_last=True,
    )
    resume_from = _resume_path(cfg, checkpoint_dir)
    overrides, sweep_dir = tracking.hydra_job()
    name = tracking.run_name(cfg.method.name, cfg.backbone.name, cfg.data.name, overrides)
    # Under SLURM one handler checkpoints and requeues on the warning signal (callbacks/requeue.py),
    # so Lightning's own SIGUSR1 requeue stays off.
    on_slurm = SLURMEnvironment.detect()
    requeue = None
    if on_slurm:
        _check_requeue_signal(cfg.trainer.requeue_signal)
        requeue = Requeue(config_lib.signal_number(cfg.trainer.requeue_signal), checkpoint_dir / "last.ckpt")
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=_strategy(cfg),
        precision=cfg.trainer.precision,
        max_epochs=cfg.trainer.max_epochs if cfg.trainer.max_steps <= 0 else -1,
        max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.progress_bar,
        logger=tracking.build_logger(cfg.logger, run_dir, name, sweep_dir, OmegaConf.to_container(cfg, resolve=True),
                                     resuming=resume_from is not None),
        callbacks=[c for c in (evaluation, image_text_evaluation, pictures, collapse, throughput, checkpoints, requeue,
                               *callbacks) if c is not None],
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if on_slurm else [])],
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the data module shards the data itself (GlobalBatchSampler)
    )
    if trainer.is_global_zero:
        log.info(
            "run dir %s | %s on %s | global batch %d = %d per process x %d processes x %d accumulation "
            "| lr = %s | %d steps per epoch, %d steps",
            run_dir, cfg.method.name, cfg.data.name, config_lib.global_batch_size(cfg),
            datamodule.per_process_batch, world, cfg.trainer.accumulate_grad_batches,
            _lr_rule(cfg), steps_per_epoch, schedule.total_steps,
        )
    # Our own checkpoints hold callback and loop state besides tensors: full unpickling.
    trainer.fit(method, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
    # The final state, final evaluation included (ModelCheckpoint saves only on its step grid).
    trainer.save_checkpoint(str(checkpoint_dir / "last.ckpt"), weights_only=False)
    export_backbone(cfg, method.eval_backbone, run_dir / "backbone.safetensors", trainer.is_global_zero)

    summary = _summary(cfg, trainer, method, datamodule, evaluation, throughput, checkpoints, started,
                       steps_per_epoch)
    if image_text_evaluation is not None:
        summary.update(image_text_evaluation.results)
        summary["image_text_eval_protocol"] = image_text_evaluation.protocol()
    summary.update(collapse.summary())
    summary["run_name"] = name
    if trainer.is_global_zero and cfg.logger.name == "wandb" and cfg.logger.log_checkpoint:
        files = [checkpoint_dir / "last.ckpt", run_dir / "backbone.safetensors"]
        tracking.log_checkpoint_artifact(trainer.logger, files, name=f"model-{trainer.logger.version}")
    if trainer.is_global_zero:
        path = run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("summary: %s", path)
    return summary


def _cpu_threads(processes_per_node: int) -> None:
    """Threads for torch's CPU ops in this process: OMP_NUM_THREADS when set (applied here too, as
    torch may have read the environment before it was set), else the task's CPUs under SLURM,
    else the machine's cores split between the processes of this node (as Lightning does when it
    starts them; sslrun starts them itself, and each would use every core)."""
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if given.isdigit() and int(given) > 0:
        threads = int(given)
    elif "SLURM_CPUS_PER_TASK" in os.environ:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    elif processes_per_node > 1:
        threads = max(1, (os.cpu_count() or 1) // processes_per_node)
    else:
        return
    torch.set_num_threads(threads)


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


def build_method(cfg: DictConfig, lr_schedule: WarmupCosine, num_classes: Optional[int],
                 steps_per_epoch: int) -> L.LightningModule:
    """The method `cfg.method.name` names, on its backbone, with global BN when asked for.

    `steps_per_epoch` turns the schedules given in epochs (DINO's) into steps."""
    method = METHODS[cfg.method.name](
        cfg.method,
        backbone=build_backbone(cfg.backbone, in_chans=cfg.data.channels),
        optimizer_cfg=cfg.optimizer,
        lr_schedule=lr_schedule,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        config=OmegaConf.to_container(cfg, resolve=True),
        sharding=OmegaConf.to_container(cfg.trainer.fsdp) if cfg.trainer.name == "fsdp" else None,
    )
    if cfg.trainer.sync_batchnorm and config_lib.world_size(cfg) > 1:
        convert_to_global_bn(method)
    return method


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


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
    peak = config_lib.scaled_lr(cfg)
    warmup = min(total, round(cfg.scheduler.warmup_epochs * steps_per_epoch))
    return WarmupCosine(peak=peak, total_steps=total, warmup_steps=warmup,
                        final=peak * cfg.scheduler.final_lr_ratio), steps_per_epoch


def _lr_rule(cfg: DictConfig) -> str:
    o, batch = cfg.optimizer, config_lib.global_batch_size(cfg)
    rule = {"linear": f"{o.base_lr} x {batch}/256", "sqrt": f"{o.base_lr} x sqrt({batch})", "none": f"{o.base_lr}"}
    return f"{rule[o.lr_scaling]} = {config_lib.scaled_lr(cfg):.6g}"


def _strategy(cfg: DictConfig):
    if cfg.trainer.name == "single":
        return "auto"
    if cfg.trainer.name == "fsdp":  # the method shards itself in configure_model
        return AtomicShardedStrategy(data_parallel_size=config_lib.world_size(cfg), tensor_parallel_size=1)
    return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


def _check_requeue_signal(name: str) -> None:
    """submitit (hydra/launcher=slurm) asks SLURM for its own signal; sslrun must listen for it."""
    submitit_signal = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    same = config_lib.signal_number(name) == config_lib.signal_number(submitit_signal)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and not same:
        raise ConfigError(f"trainer.requeue_signal={name}: submitit warns this job with {submitit_signal} "
                          f"(SUBMITIT_PREEMPT_SIGNAL); set trainer.requeue_signal={submitit_signal}")


def _resume_path(cfg: DictConfig, checkpoint_dir: Path) -> Optional[str]:
    """resume=auto picks <run dir>/checkpoints/last.ckpt, or the newest intact step checkpoint.

    A checkpoint is a file (single process, DDP) or a directory of shards (trainer=fsdp)."""
    path = None if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto":
        candidates = [checkpoint_dir / "last.ckpt"] + sorted(
            checkpoint_dir.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]), reverse=True
        )
        for candidate in filter(Path.exists, candidates):
            if _intact(candidate):
                path = str(candidate)
                log.info("resuming from %s", path)
                break
            log.warning("ignoring unreadable checkpoint %s", candidate)
    if path is not None and Path(path).is_dir() and cfg.trainer.name != "fsdp":
        raise ConfigError(f"resume: {path} is a sharded checkpoint (a directory, written under trainer=fsdp); "
                          f"resume it with trainer=fsdp, on any number of devices")
    return path


def _intact(path: Path) -> bool:
    return zipfile.is_zipfile(path) if path.is_file() else is_complete_sharded_checkpoint(path)


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
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    log.info("backbone weights: %s", path)


def _summary(cfg, trainer, method, datamodule, evaluation, throughput, checkpoints, started,
             steps_per_epoch) -> dict:
    """The run's results (design notes: summary.json). Collective: every process must call it."""
    final_loss = method.epoch_loss.compute().item() if method.epoch_loss.update_count else float("nan")
    skipped = torch.tensor([datamodule.skipped_images()], dtype=torch.long)
    device = trainer.strategy.root_device  # the training device (Lightning moves a single-device model back to CPU)
    skipped = int(trainer.strategy.reduce(skipped.to(device), reduce_op="max").item())
    results = evaluation.results if evaluation is not None else {}
    if device.type == "cuda":
        peak = {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "cuda max allocated, process 0"}
    else:
        peak = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_memory_kind": "cpu max resident set, process 0"}
    last = Path(checkpoints.dirpath) / "last.ckpt"
    weights = Path(checkpoints.dirpath).parent / "backbone.safetensors"
    return {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "global_step": trainer.global_step,
        "epochs": round(trainer.global_step / steps_per_epoch, 3),
        "train_loss": final_loss,
        "train_loss_protocol": "mean training loss over the last epoch, all processes",
        "knn_top1": results.get("knn_top1"),
        "knn_top1_random_init": results.get("knn_top1_random_init"),
        "knn_top1_pixels": results.get("knn_top1_pixels"),
        "linear_probe_top1": results.get("linear_probe_top1"),
        "eval_protocol": evaluation.protocol() if evaluation is not None else "no online evaluation",
        "images_per_sec": throughput.images_per_sec,
        **peak,
        "wall_time_sec": time.time() - started,
        "world_size": trainer.world_size,
        "global_batch_size": config_lib.global_batch_size(cfg),
        "lr": config_lib.scaled_lr(cfg),
        "lr_rule": _lr_rule(cfg),
        "skipped_images": skipped,
        "checkpoint": str(last) if last.exists() else None,
        "backbone_weights": str(weights) if weights.is_file() else None,
    }

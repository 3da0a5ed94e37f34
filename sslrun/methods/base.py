"""What every method shares: backbone, online linear probe, optimizer, schedules and logging.

A method subclasses SSLMethod, registers itself (methods.registry) and implements
`training_loss(batch) -> StepOutput`; methods with a momentum teacher also implement
`after_optimizer_step`. Everything else (parameter groups, the per-step learning rate, the probe,
loss bookkeeping) lives here.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from sslrun.data.transforms import Upscaled
from sslrun.distributed.fsdp import fsdp_options, shard_method
from sslrun.optim import WarmupCosine, build_optimizer, parameter_groups
from sslrun.redaction import redact


@dataclass
class StepOutput:
    loss: torch.Tensor
    features: torch.Tensor  # backbone features of the first view, for the online probe
    embedding: torch.Tensor  # what the loss acts on (first view), for the collapse monitor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


class SSLMethod(L.LightningModule):
    skip_momentum_update = False  # set by the non-finite guard for a step whose update it drops
    # Per-image masks the data loader draws in its workers (batch["masks"]; a callable of an image's
    # sample generator, see data.datamodule.TrainingViews), for methods that mask patches; none here.
    sample_masks = None

    @staticmethod
    def upscaled_crops(method_cfg) -> Optional[Upscaled]:
        """Higher-resolution copies of some crops the method needs in its batches (as
        batch["upscaled_views"]), cut by the data pipeline from the source images; none here."""
        return None

    def __init__(self, backbone: nn.Module, optimizer_cfg, lr_schedule: WarmupCosine,
                 num_classes: Optional[int], steps_per_epoch: int, config: Optional[dict] = None,
                 sharding: Optional[dict] = None):
        super().__init__()
        self.sharding = sharding  # trainer.fsdp under trainer=fsdp
        self.save_hyperparameters({"config": redact(config or {})})  # what loggers and checkpoints record
        self.backbone = backbone
        self.optimizer_cfg = optimizer_cfg
        self.lr_schedule = lr_schedule
        self.steps_per_epoch = steps_per_epoch
        final_wd = optimizer_cfg.final_weight_decay
        # DINO's weight decay schedule: cosine from weight_decay to final_weight_decay (null: constant).
        self.weight_decay_schedule = None if final_wd is None else WarmupCosine(
            peak=optimizer_cfg.weight_decay, final=final_wd, total_steps=lr_schedule.total_steps)
        self.probe = nn.Linear(backbone.num_features, num_classes) if num_classes else None
        self.epoch_loss = MeanMetric(nan_strategy="ignore")  # a skipped non-finite step is not averaged in

    def configure_model(self) -> None:
        """Under trainer=fsdp Lightning calls this with the device mesh set: shard every module by
        the plan in `distributed.fsdp` (once). Other strategies leave the model whole."""
        if self._device_mesh is None or self.sharding is None or getattr(self, "_sharded", False):
            return
        options = dict(self.sharding)
        checkpointing = options.pop("activation_checkpointing")
        shard_method(self, fsdp_options(self._device_mesh["data_parallel"], **options), checkpointing)
        self._sharded = True

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone evaluators and pictures look at: the trained one, unless a method's paper
        evaluates another (DINO: the teacher)."""
        return self.backbone

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone feature every evaluator uses."""
        return self.eval_backbone(images)

    def project_views(self, views: List[torch.Tensor], head: nn.Module):
        """(backbone features of all views, the head's output per view): one backbone pass over
        every view, so BN statistics span all of them, as in SimCLR's reference code."""
        features = self.backbone(torch.cat(views))
        return features, head(features).chunk(len(views))

    def training_loss(self, batch: dict) -> StepOutput:
        raise NotImplementedError

    def method_pictures(self, images: torch.Tensor, inputs: torch.Tensor, augment) -> Dict[str, object]:
        """Pictures of what this method does (MAE: reconstructions), name -> PIL image, drawn with
        the ViT pictures at every evaluation: held-out uint8 `images`, their normalised `inputs`,
        the data's `augment` (its mean and std). None by default."""
        return {}

    def after_optimizer_step(self) -> None:
        """Runs once per optimizer step, after it (momentum teachers update here); not after a
        step whose update the non-finite guard skipped (callbacks/nonfinite.py)."""

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        out = self.training_loss(batch)
        loss = out.loss
        self.epoch_loss.update(loss.detach())
        # The loss of the global batch (the mean over processes), as one process would compute it.
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True)
        for name, value in out.metrics.items():
            self.log(f"train/{name}", value)
        if self.probe is not None:
            loss = loss + self._probe_loss(out.features.detach(), batch["label"])
        return {"loss": loss, "embedding": out.embedding.detach()}

    def _probe_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the online linear probe; images with unknown labels (-1) are skipped.

        The probe sees detached features, so it never shapes the representation."""
        logits = self.probe(features.float())
        known = labels >= 0
        if not known.any():
            return logits.sum() * 0.0  # keeps the probe in the graph for DDP's gradient sync
        loss = F.cross_entropy(logits[known], labels[known])
        accuracy = (logits[known].argmax(1) == labels[known]).float().mean()
        self.log("train/probe_loss", loss.detach())
        self.log("train/probe_top1", accuracy)
        return loss

    def on_train_epoch_start(self) -> None:
        self.epoch_loss.reset()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Sets every group's lr for this step: the schedule times the group's `lr_scale`, or the
        group's `constant_lr` (the probe; SimSiam's predictor); and the scheduled weight decay."""
        lr = self.lr_schedule(self.global_step)
        weight_decay = self.weight_decay_schedule(self.global_step) if self.weight_decay_schedule else None
        for group in self.optimizers().param_groups:
            constant = group.get("constant_lr")
            group["lr"] = constant if constant is not None else lr * group.get("lr_scale", 1.0)
            if weight_decay is not None and group.get("scheduled_weight_decay"):
                group["weight_decay"] = weight_decay
        self.log("lr", lr, prog_bar=True)
        if weight_decay is not None:
            self.log("weight_decay", weight_decay)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.skip_momentum_update:
            self.skip_momentum_update = False
        else:
            self.after_optimizer_step()

    def optimizer_groups(self) -> List[dict]:
        """Parameter groups of everything but the probe; methods may split off modules."""
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("probe.")]
        return self._groups(named)

    def _groups(self, named, **extra) -> List[dict]:
        cfg = self.optimizer_cfg
        groups = parameter_groups(named, cfg.weight_decay, cfg.exclude_bias_and_norm, cfg.bias_and_norm_lr_scale)
        return [{**group, **extra} for group in groups]

    def configure_optimizers(self):
        groups = self.optimizer_groups()
        if self.probe is not None:
            groups.append({"params": list(self.probe.parameters()), "constant_lr": self.optimizer_cfg.probe_lr,
                           "weight_decay": 0.0, "lars_adapt": False})
        return build_optimizer(self.optimizer_cfg, groups, self.lr_schedule(0))

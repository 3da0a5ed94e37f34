"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")."""

from dataclasses import dataclass, field

import torch
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import DINOHeadSpec, Schema, crop_sizes, require_positive, require_unit_interval
from sslrun.distributed import all_reduce_sum
from sslrun.losses import centered_teacher_probs, dino_loss, entropy, mean_over_batch, update_center
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.teacher import MomentumTeacher
from sslrun.models.heads import DINOHead
from sslrun.models.vit import class_tokens, grouped_forward, packed_forward, require_packing
from sslrun.optim import WarmupCosine


@dataclass
class DINOConfig(Schema):
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

    @classmethod
    def check(cls, cfg):
        m, sizes = cfg.method, crop_sizes(cfg)
        require(1 <= m.global_crops < len(sizes),
                f"method.global_crops={m.global_crops}: must be at least 1 and fewer than the {len(sizes)} crops "
                f"the augmentation makes")
        require(len(set(sizes[:m.global_crops])) == 1,
                f"method.global_crops={m.global_crops}: the first {m.global_crops} crops must share one size "
                f"(augmentation sizes: {sizes}); list the global crops first")
        require_positive(m, "method", "student_temperature", "teacher_temperature", "warmup_teacher_temperature")
        require_unit_interval(m, "method", "momentum", "final_momentum", "center_momentum")


# Heads at toy sizes, for the generic tests (methods.registry).
HEADS = ("method.head.hidden_dim=32", "method.head.bottleneck_dim=16", "method.head.out_dim=24")


@register_method("dino", DINOConfig, views=None, test_overrides=HEADS)
class DINO(SSLMethod):
    """Self-distillation with no labels: a student (all crops) matches a momentum teacher (global
    crops only) whose outputs are centred (c, momentum `center_momentum`) and sharpened (teacher
    temperature, warmed up linearly), by the cross-entropy of `losses.dino_loss`. The multi-crop
    views run as one packed sequence (`pack_crops=true`) or one batch per crop size.

    Logged collapse signals (sec. 5.3): the teacher entropy h(P_t) (-> log K when the outputs go
    uniform) and KL(P_t || P_s) = H(P_t, P_s) - h(P_t) (-> 0 when the two collapse together)."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        require_packing(self.backbone, cfg.name)
        self.global_crops = cfg.global_crops
        self.forward_crops = packed_forward if cfg.pack_crops else grouped_forward
        self.head = DINOHead.from_spec(self.backbone.num_features, cfg.head)
        self.add_student_parts(cfg)
        self.teacher = self.build_teacher(cfg)
        self.register_buffer("center", torch.zeros(1, cfg.head.out_dim))
        self.student_temperature = cfg.student_temperature
        self.center_momentum = cfg.center_momentum
        warmup = round(cfg.warmup_teacher_temperature_epochs * self.steps_per_epoch)
        self.teacher_temperature = WarmupCosine(start=cfg.warmup_teacher_temperature, peak=cfg.teacher_temperature,
                                                warmup_steps=warmup, total_steps=warmup, final=cfg.teacher_temperature)
        self.freeze_last_layer_steps = round(cfg.freeze_last_layer_epochs * self.steps_per_epoch)

    def add_student_parts(self, cfg) -> None:
        """Modules the student has besides backbone and head (DINOv2: mask token, iBOT head)."""

    def build_teacher(self, cfg) -> torch.nn.Module:
        """The teacher: an EMA of the student modules."""
        return MomentumTeacher(self.student_modules(), cfg.momentum, cfg.final_momentum, self.lr_schedule.total_steps)

    def student_modules(self):
        """What the teacher averages, in order."""
        return [self.backbone, self.head]

    def teacher_modules(self):
        """The teacher's [backbone, head, ...], in the order of student_modules."""
        return list(self.teacher.encoder)

    @property
    def eval_backbone(self):
        """The teacher: the better model throughout training, and the one the paper evaluates."""
        return self.teacher_modules()[0]

    def teacher_targets(self, global_views) -> torch.Tensor:
        """Centred, sharpened teacher distributions [crops, B, K]; updates the center."""
        backbone, head = self.teacher_modules()[:2]
        tokens = self.forward_crops(backbone, global_views)
        logits = head(torch.cat([class_tokens(t) for t in tokens])).float()
        probs = centered_teacher_probs(logits, self.center, self.teacher_temperature(self.global_step))
        self.center.copy_(update_center(self.center, mean_over_batch(logits, all_reduce_sum), self.center_momentum))
        return probs.unflatten(0, (len(global_views), -1))

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        with torch.no_grad():
            targets = self.teacher_targets(views[: self.global_crops])
        tokens = self.forward_crops(self.backbone, views)
        features = torch.cat([class_tokens(t) for t in tokens])
        logits = (self.head(features).float() / self.student_temperature).chunk(len(views))
        loss = dino_loss(logits, targets)
        teacher_entropy = entropy(targets.flatten(0, 1))
        first = features[: views[0].shape[0]]
        return StepOutput(loss, first, first, {
            "teacher_entropy": teacher_entropy.detach(),
            "teacher_student_kl": loss.detach() - teacher_entropy.detach(),
            "teacher_temperature": torch.tensor(self.teacher_temperature(self.global_step)),
            **self.ema_metrics(),
        })

    def ema_metrics(self) -> dict:
        """The momentum the EMA of the student follows (distillation's spare EMA)."""
        return self.teacher.metrics(self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        """The prototypes stay fixed for the first `freeze_last_layer_epochs` (sec. 3.1 / appendix):
        learning them from the start makes training unstable."""
        if self.global_step < self.freeze_last_layer_steps:
            for head in self.student_modules():
                if isinstance(head, DINOHead):
                    for param in head.last_layer.parameters():
                        param.grad = None

    def after_optimizer_step(self) -> None:
        self.teacher.follow(self.student_modules(), self.global_step)

"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")."""

import torch
from timm.layers import DropPath

from sslrun.distributed import all_reduce_sum
from sslrun.losses import centered_teacher_probs, dino_loss, entropy, mean_over_batch, update_center
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.ema import MomentumEncoder
from sslrun.models.heads import DINOHead
from sslrun.models.vit import class_tokens, grouped_forward, packed_forward, require_packing
from sslrun.optim import WarmupCosine


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
        self.teacher = self.momentum_teacher()
        self.register_buffer("center", torch.zeros(1, cfg.head.out_dim))
        self.student_temperature = cfg.student_temperature
        self.center_momentum = cfg.center_momentum
        warmup = round(cfg.warmup_teacher_temperature_epochs * self.steps_per_epoch)
        self.teacher_temperature = WarmupCosine(start=cfg.warmup_teacher_temperature, peak=cfg.teacher_temperature,
                                                warmup_steps=warmup, total_steps=warmup, final=cfg.teacher_temperature)
        self.momentum = WarmupCosine(peak=cfg.momentum, final=cfg.final_momentum,
                                     total_steps=self.lr_schedule.total_steps)
        self.freeze_last_layer_steps = round(cfg.freeze_last_layer_epochs * self.steps_per_epoch)

    def student_modules(self):
        """What the teacher averages, in order."""
        return [self.backbone, self.head]

    @property
    def eval_backbone(self):
        """The teacher: the better model throughout training, and the one the paper evaluates."""
        return self.teacher.encoder[0]

    def momentum_teacher(self) -> MomentumEncoder:
        teacher = MomentumEncoder(self.student_modules())
        for module in teacher.modules():  # the teacher never drops paths (DINO's reference code)
            if isinstance(module, DropPath):
                module.drop_prob = 0.0
        return teacher

    def teacher_targets(self, global_views) -> torch.Tensor:
        """Centred, sharpened teacher distributions [crops, B, K]; updates the center."""
        backbone, head = self.teacher.encoder
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
            "momentum": torch.tensor(self.momentum(self.global_step)),
        })

    def on_before_optimizer_step(self, optimizer) -> None:
        """The prototypes stay fixed for the first `freeze_last_layer_epochs` (sec. 3.1 / appendix):
        learning them from the start makes training unstable."""
        if self.global_step < self.freeze_last_layer_steps:
            for head in self.student_modules():
                if isinstance(head, DINOHead):
                    for param in head.last_layer.parameters():
                        param.grad = None

    def after_optimizer_step(self) -> None:
        self.teacher.update(self.student_modules(), self.momentum(self.global_step))

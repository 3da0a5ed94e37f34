"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision")."""

import random
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from sslrun.config.errors import require, require_choice
from sslrun.config.schema import DINOHeadSpec
from sslrun.data.masking import batch_masks
from sslrun.data.transforms import Upscaled
from sslrun.distributed import all_reduce_sum, rank
from sslrun.losses import (
    centered_teacher_probs, dino_loss, entropy, gram_loss, ibot_patch_loss, koleo_loss, mean_over_batch,
    sinkhorn_knopp, update_center,
)
from sslrun.methods.base import StepOutput
from sslrun.methods.dino import DINO, HEADS, DINOConfig
from sslrun.methods.registry import register_method
from sslrun.models.ema import MomentumEncoder
from sslrun.models.heads import DINOHead
from sslrun.models.vit import MaskToken, class_tokens, patch_tokens
from sslrun.optim import layerwise_groups

CENTERINGS = ("sinkhorn_knopp", "center")


@dataclass
class IBOTConfig:
    loss_weight: float = MISSING
    mask_ratio: List[float] = MISSING
    mask_probability: float = MISSING
    separate_head: bool = MISSING
    head: DINOHeadSpec = field(default_factory=DINOHeadSpec)


@dataclass
class GramConfig:
    weight: float = MISSING
    start_step: int = MISSING
    refresh_every: Optional[int] = MISSING
    teacher_upscale: int = MISSING
    clamp_negative: bool = MISSING


@dataclass
class DINOv2Config(DINOConfig):
    centering: str = MISSING
    sinkhorn_iterations: int = MISSING
    dino_weight: float = MISSING
    koleo_weight: float = MISSING
    layerwise_lr_decay: float = MISSING
    patch_embed_lr_mult: float = MISSING
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    gram: GramConfig = field(default_factory=GramConfig)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        m = cfg.method
        require_choice("method.centering", m.centering, CENTERINGS)
        require(len(m.ibot.mask_ratio) == 2 and 0 < m.ibot.mask_ratio[0] <= m.ibot.mask_ratio[1] < 1,
                f"method.ibot.mask_ratio={list(m.ibot.mask_ratio)}: need [low, high] with 0 < low <= high < 1")
        require(0 < m.ibot.mask_probability <= 1,
                f"method.ibot.mask_probability={m.ibot.mask_probability}: must be in (0, 1]")
        require(0 < m.layerwise_lr_decay <= 1, f"method.layerwise_lr_decay={m.layerwise_lr_decay}: must be in (0, 1]")
        gram = m.gram
        require(gram.weight >= 0, f"method.gram.weight={gram.weight}: 0 (off) or positive (DINOv3: 2)")
        require(gram.start_step >= 0, f"method.gram.start_step={gram.start_step}: must be 0 or more")
        require(gram.refresh_every is None or gram.refresh_every > 0,
                f"method.gram.refresh_every={gram.refresh_every}: positive, or null (never refreshed)")
        require(gram.teacher_upscale >= 1, f"method.gram.teacher_upscale={gram.teacher_upscale}: 1 (the global crops' "
                                           f"size) or more (DINOv3's high-resolution teacher: 2)")


IBOT_HEAD = ("method.ibot.head.hidden_dim=32", "method.ibot.head.bottleneck_dim=16", "method.ibot.head.out_dim=24")


@register_method("dinov2", DINOv2Config, views=None, test_overrides=(*HEADS, *IBOT_HEAD), exempt={
    "two_processes": "masks are drawn per process; tests/methods/test_dino.py fixes them and compares 2 processes "
                     "with 1 (KoLeo off: its neighbours are searched per process, as in DINOv2)"})
class DINOv2(DINO):
    """DINO's image-level loss on class tokens, plus:

    - iBOT: the student's global crops have block-wise masked patches (a learned mask token in
      their place); at the masked positions its patch outputs (`ibot` head, or the DINO head when
      `ibot.separate_head=false`) match the teacher's on the unmasked crop (`losses.ibot_patch_loss`);
    - KoLeo on the student's class tokens of each global crop (`losses.koleo_loss`);
    - teacher targets by Sinkhorn-Knopp over the global batch (`centering=sinkhorn_knopp`, the
      default) or DINO's centring (`centering=center`);
    - layer-wise lr decay and a patch-embedding lr multiplier (`optimizer_groups`).

    loss = dino_weight * L_dino + ibot.loss_weight * L_ibot + koleo_weight * L_koleo
           (+ gram.weight * L_Gram from step gram.start_step; see `gram_targets`)."""

    masks_patches = True  # the student's global crops are masked (distillation: nothing is)

    def __init__(self, cfg, **base):
        super().__init__(cfg, **base)
        self.cfg = cfg
        self.register_buffer("ibot_center", torch.zeros(1, self.student_modules()[-1].out_dim))
        self.grid = self.backbone.patch_embed.dynamic_feat_size(self.backbone.patch_embed.img_size)
        gram = cfg.gram
        if gram.weight > 0:  # DINOv3's Gram teacher: a frozen copy of the EMA teacher's backbone, loaded later
            self.gram_teacher = MomentumEncoder([self.teacher_modules()[0]])
            self.gram_start, self.gram_every = gram.start_step, gram.refresh_every

    @staticmethod
    def upscaled_crops(method_cfg) -> Optional[Upscaled]:
        """DINOv3's high-resolution Gram teacher: the global crops cut again from the images at
        gram.teacher_upscale times their size."""
        gram = method_cfg.gram
        return Upscaled(method_cfg.global_crops, gram.teacher_upscale) if gram.weight > 0 and gram.teacher_upscale > 1 \
            else None

    def gram_active(self, step: int) -> bool:
        return self._modules.get("gram_teacher") is not None and step >= self.gram_start

    def gram_refresh_due(self, step: int) -> bool:
        """The Gram teacher is loaded from the EMA teacher at `gram_start`, then every `gram_every` steps."""
        if not self.gram_active(step):
            return False
        since = step - self.gram_start
        return since == 0 or (self.gram_every is not None and since % self.gram_every == 0)

    @torch.no_grad()
    def gram_targets(self, global_views, upscaled_views=None) -> torch.Tensor:
        """The Gram teacher's patch features of the (unmasked) global crops, [crops * B, patches, D].

        With `gram.teacher_upscale` k > 1 (DINOv3's high-resolution refinement) the teacher sees
        `upscaled_views`, the same crops cut from the images at k times their size (the data
        pipeline's `upscaled_crops`), k x k patches for each of the student's, and its feature map
        is resized (bicubic) back to the student's grid: smoother, higher-resolution patch
        similarities to anchor to."""
        backbone = self.gram_teacher.encoder[0]
        student_grid = tuple(self.backbone.patch_embed.dynamic_feat_size(global_views[0].shape[-2:]))
        if self.upscaled_crops(self.cfg) is not None:
            if upscaled_views is None:
                raise ValueError("method.gram.teacher_upscale > 1: the batch has no upscaled_views "
                                 "(the data module builds them from the method's upscaled_crops)")
            global_views = upscaled_views
        tokens = self.forward_crops(backbone, global_views)
        patches = torch.cat([patch_tokens(backbone, t) for t in tokens])
        teacher_grid = tuple(backbone.patch_embed.dynamic_feat_size(global_views[0].shape[-2:]))
        if teacher_grid != student_grid:
            feature_map = patches.transpose(1, 2).unflatten(2, teacher_grid)
            feature_map = F.interpolate(feature_map.float(), size=student_grid, mode="bicubic", align_corners=False)
            patches = feature_map.flatten(2).transpose(1, 2)
        return patches

    def add_student_parts(self, cfg) -> None:
        width = self.backbone.num_features
        self.mask_token = MaskToken(width) if self.masks_patches else None
        if cfg.ibot.separate_head:
            self.ibot_head = DINOHead.from_spec(width, cfg.ibot.head)

    def student_modules(self):
        """[backbone, DINO head, iBOT head when separate]: the last one is iBOT's."""
        separate = self._modules.get("ibot_head")
        return [self.backbone, self.head] + ([separate] if separate is not None else [])

    def teacher_modules(self):
        """The teacher's [backbone, DINO head, iBOT head] (the last two the same module when shared)."""
        modules = super().teacher_modules()
        return modules[0], modules[1], modules[-1]

    def _teacher_probs(self, logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
        """Targets from teacher logits; updates `center` when DINO centring is used."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.cfg.sinkhorn_iterations, all_reduce_sum)
        probs = centered_teacher_probs(logits, center, temperature)
        center.copy_(update_center(center, mean_over_batch(logits, all_reduce_sum), self.center_momentum))
        return probs

    def masks(self, batch: int, device) -> torch.Tensor:
        """The patches [global crops * B, patches] the iBOT loss covers: block-wise masks (DINOv2's
        rule, per process), or every patch when nothing is masked (distillation)."""
        if not self.masks_patches:
            return torch.ones(self.global_crops * batch, self.grid[0] * self.grid[1], dtype=torch.bool, device=device)
        rng = random.Random(int(torch.randint(2**31 - 1, (1,))) + rank())
        return torch.cat([batch_masks(batch, self.grid, self.cfg.ibot.mask_ratio, self.cfg.ibot.mask_probability, rng)
                          for _ in range(self.global_crops)]).to(device)

    def student_tokens(self, views, masks: torch.Tensor):
        """The student's tokens of every crop, the global crops' masked patches replaced by the mask token."""
        if not self.masks_patches:
            return self.forward_crops(self.backbone, views)
        crop_masks = list(masks.chunk(self.global_crops)) + [None] * (len(views) - self.global_crops)
        return self.forward_crops(self.backbone, views, crop_masks, self.mask_token)

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        globals_, batch_size = views[: self.global_crops], views[0].shape[0]
        masks = self.masks(batch_size, views[0].device)
        temperature = self.teacher_temperature(self.global_step)

        with torch.no_grad():
            backbone, head, ibot_head = self.teacher_modules()
            tokens = self.forward_crops(backbone, globals_)
            dino_logits = head(torch.cat([class_tokens(t) for t in tokens])).float()
            patches = torch.cat([patch_tokens(backbone, t) for t in tokens])
            ibot_logits = ibot_head(patches[masks]).float()
            dino_targets = self._teacher_probs(dino_logits, self.center, temperature)
            ibot_targets = self._teacher_probs(ibot_logits, self.ibot_center, temperature)

        tokens = self.student_tokens(views, masks)
        classes = torch.cat([class_tokens(t) for t in tokens])
        student = (self.head(classes).float() / self.student_temperature).chunk(len(views))
        dino = dino_loss(student, dino_targets.unflatten(0, (self.global_crops, -1)))
        student_patches = torch.cat([patch_tokens(self.backbone, t) for t in tokens[: self.global_crops]])
        ibot_student = self.student_modules()[-1](student_patches[masks]).float() / self.student_temperature
        ibot = ibot_patch_loss(ibot_student, ibot_targets, masks)
        global_classes = classes[: self.global_crops * batch_size]
        koleo = sum(koleo_loss(c) for c in global_classes.chunk(self.global_crops))
        loss = self.cfg.dino_weight * dino + self.cfg.ibot.loss_weight * ibot + self.cfg.koleo_weight * koleo
        extra = {}
        if self.gram_active(self.global_step):
            if self.gram_refresh_due(self.global_step):
                self.gram_teacher.update([self.teacher_modules()[0]], 0.0)  # momentum 0: the EMA teacher, copied
            gram = gram_loss(student_patches, self.gram_targets(globals_, batch.get("upscaled_views")),
                             self.cfg.gram.clamp_negative)
            loss = loss + self.cfg.gram.weight * gram
            extra = {"gram_loss": gram.detach()}

        teacher_entropy = entropy(dino_targets)
        first = classes[:batch_size]
        return StepOutput(loss, first, first, {
            "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
            "teacher_entropy": teacher_entropy.detach(),
            "teacher_student_kl": dino.detach() - teacher_entropy.detach(),
            "masked_patches": masks.float().mean(),
            "teacher_temperature": torch.tensor(temperature),
            **self.ema_metrics(), **extra,
        })

    def optimizer_groups(self):
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("probe.")]
        cfg = self.optimizer_cfg
        return layerwise_groups(named, len(self.backbone.blocks), self.cfg.layerwise_lr_decay,
                                self.cfg.patch_embed_lr_mult, cfg.weight_decay, cfg.exclude_bias_and_norm)

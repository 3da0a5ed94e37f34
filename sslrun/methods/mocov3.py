"""MoCo v3 (Chen, Xie & He 2021): in-batch contrast of a predictor output with momentum keys."""

import torch

from sslrun.config import ConfigError
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import infonce_batch_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.ema import MomentumEncoder
from sslrun.models.heads import MLPHead
from sslrun.optim import WarmupCosine


class MoCoV3(SSLMethod):
    """loss = ctr(q1, k2) + ctr(q2, k1): q the online predictor output, k the momentum encoder's
    projection of the other view, gathered over processes (the other keys of the global batch are
    the negatives), ctr scaled by 2T. Momentum from `momentum` to `final_momentum` on a cosine.
    `frozen_patch_embed=true` keeps a ViT's random patch projection fixed (the paper's sec. 5
    stability trick)."""

    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        if cfg.frozen_patch_embed:
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ConfigError("method.frozen_patch_embed=true: the backbone has no patch embedding; use a ViT "
                                  "(backbone=vit_tiny_p4 for 28-32 px images, backbone=vit_small at 224 px)")
            patch_embed.requires_grad_(False)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.predictor = MLPHead.from_spec(self.projector.out_dim, cfg.predictor_mlp)
        self.target = MomentumEncoder([self.backbone, self.projector])
        self.temperature = cfg.temperature
        self.momentum = WarmupCosine(peak=cfg.momentum, final=cfg.final_momentum,
                                     total_steps=self.lr_schedule.total_steps)

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))
        projections = self.projector(features)
        q1, q2 = self.predictor(projections).chunk(2)
        with torch.no_grad():
            k1, k2 = (all_gather_with_grad(k) for k in self.target(torch.cat(views)).chunk(2))
        offset = rank() * batch_size
        loss = (infonce_batch_loss(q1, k2, self.temperature, offset)
                + infonce_batch_loss(q2, k1, self.temperature, offset))
        return StepOutput(loss, features[:batch_size], projections[:batch_size],
                          {"momentum": torch.tensor(self.momentum(self.global_step))})

    def after_optimizer_step(self) -> None:
        self.target.update([self.backbone, self.projector], self.momentum(self.global_step))  # step not yet counted

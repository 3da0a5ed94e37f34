"""BYOL (Grill et al. 2020): an online network with a predictor regresses a momentum target."""

import torch

from sslrun.losses import byol_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.ema import MomentumEncoder
from sslrun.models.heads import MLPHead
from sslrun.optim import WarmupCosine


class BYOL(SSLMethod):
    """loss = l(p1, z2') + l(p2, z1') with l = 2 - 2 cos, p the online prediction of one view and
    z' the target projection of the other; the target is an EMA of the online backbone and
    projector, its momentum rising from `momentum` to `final_momentum` on a cosine."""

    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.predictor = MLPHead.from_spec(self.projector.out_dim, cfg.predictor_mlp)
        self.target = MomentumEncoder([self.backbone, self.projector])
        self.momentum = WarmupCosine(peak=cfg.momentum, final=cfg.final_momentum,
                                     total_steps=self.lr_schedule.total_steps)

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))
        projections = self.projector(features)
        p1, p2 = self.predictor(projections).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target(torch.cat(views)).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return StepOutput(loss, features[:batch_size], projections[:batch_size],
                          {"momentum": torch.tensor(self.momentum(self.global_step))})

    def after_optimizer_step(self) -> None:
        self.target.update([self.backbone, self.projector], self.momentum(self.global_step))  # step not yet counted

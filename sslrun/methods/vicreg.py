"""VICReg (Bardes, Ponce & LeCun 2022): invariance, variance and covariance terms."""

import torch

from sslrun.distributed import all_gather_with_grad
from sslrun.losses import vicreg_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.heads import MLPHead


class VICReg(SSLMethod):
    """All three terms are computed over the global batch (gathered with gradient)."""

    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.weights = (cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight)
        self.eps = cfg.eps

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))
        z1, z2 = self.projector(features).chunk(2)
        loss, terms = vicreg_loss(all_gather_with_grad(z1), all_gather_with_grad(z2), *self.weights, eps=self.eps)
        return StepOutput(loss, features[:batch_size], z1, terms)

"""Barlow Twins (Zbontar et al. 2021): the two views' cross-correlation pushed to the identity."""

import torch

from sslrun.distributed import all_gather_with_grad
from sslrun.losses import barlow_twins_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.heads import MLPHead


class BarlowTwins(SSLMethod):
    """The loss standardises each dimension over the global batch (gathered with gradient), so
    every process computes the same loss as one process holding the whole batch would."""

    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.lambd = cfg.lambd

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))
        z1, z2 = self.projector(features).chunk(2)
        loss = barlow_twins_loss(all_gather_with_grad(z1), all_gather_with_grad(z2), self.lambd)
        return StepOutput(loss, features[:batch_size], z1)

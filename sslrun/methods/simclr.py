"""SimCLR: two augmented views, a projection MLP, NT-Xent over the global batch."""

import torch

from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import nt_xent_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.heads import MLPHead


class SimCLR(SSLMethod):
    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.temperature = cfg.temperature
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))  # one pass: BN statistics over both views
        z1, z2 = self.projector(features).chunk(2)
        loss = nt_xent_loss(
            z1, z2, self.temperature,
            all_gather_with_grad(z1), all_gather_with_grad(z2), offset=rank() * batch_size,
        )
        return StepOutput(loss, features[:batch_size], z1)

"""Barlow Twins (Zbontar et al. 2021): the two views' cross-correlation pushed to the identity."""

from dataclasses import dataclass, field

from omegaconf import MISSING

from sslrun.config.schema import MLPSpec, Schema
from sslrun.distributed import all_gather_with_grad
from sslrun.losses import barlow_twins_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR
from sslrun.models.heads import MLPHead


@dataclass
class BarlowTwinsConfig(Schema):
    name: str = MISSING
    lambd: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@register_method("barlow_twins", BarlowTwinsConfig, views=2, test_overrides=PROJECTOR)
class BarlowTwins(SSLMethod):
    """The loss standardises each dimension over the global batch (gathered with gradient), so
    every process computes the same loss as one process holding the whole batch would."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.lambd = cfg.lambd

    def training_loss(self, batch: dict) -> StepOutput:
        features, (z1, z2) = self.project_views(batch["views"], self.projector)
        loss = barlow_twins_loss(all_gather_with_grad(z1), all_gather_with_grad(z2), self.lambd)
        return StepOutput(loss, features[:z1.shape[0]], z1)

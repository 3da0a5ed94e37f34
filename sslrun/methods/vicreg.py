"""VICReg (Bardes, Ponce & LeCun 2022): invariance, variance and covariance terms."""

from dataclasses import dataclass, field

from omegaconf import MISSING

from sslrun.config.schema import MLPSpec, Schema
from sslrun.distributed import all_gather_with_grad
from sslrun.losses import vicreg_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR
from sslrun.models.heads import MLPHead


@dataclass
class VICRegConfig(Schema):
    name: str = MISSING
    invariance_weight: float = MISSING
    variance_weight: float = MISSING
    covariance_weight: float = MISSING
    eps: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)


@register_method("vicreg", VICRegConfig, views=2, test_overrides=PROJECTOR)
class VICReg(SSLMethod):
    """All three terms are computed over the global batch (gathered with gradient)."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.weights = (cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight)
        self.eps = cfg.eps

    def training_loss(self, batch: dict) -> StepOutput:
        features, (z1, z2) = self.project_views(batch["views"], self.projector)
        loss, terms = vicreg_loss(all_gather_with_grad(z1), all_gather_with_grad(z2), *self.weights, eps=self.eps)
        return StepOutput(loss, features[:z1.shape[0]], z1, terms)

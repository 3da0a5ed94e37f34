"""SimCLR: two augmented views, a projection MLP, NT-Xent over the global batch."""

from dataclasses import dataclass, field

from omegaconf import MISSING

from sslrun.config.schema import MLPSpec, Schema, require_positive
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import nt_xent_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.models.heads import MLPHead


@dataclass
class SimCLRConfig(Schema):
    name: str = MISSING
    temperature: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)

    @classmethod
    def check(cls, cfg):
        require_positive(cfg.method, "method", "temperature")


# A projector at toy sizes, for the generic tests (methods.registry).
PROJECTOR = ("method.projector.hidden_dim=32", "method.projector.out_dim=16")


@register_method("simclr", SimCLRConfig, views=2, test_overrides=PROJECTOR)
class SimCLR(SSLMethod):
    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.temperature = cfg.temperature
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)

    def training_loss(self, batch: dict) -> StepOutput:
        features, (z1, z2) = self.project_views(batch["views"], self.projector)
        loss = nt_xent_loss(z1, z2, self.temperature, all_gather_with_grad(z1), all_gather_with_grad(z2),
                            offset=rank() * z1.shape[0])
        return StepOutput(loss, features[:z1.shape[0]], z1)

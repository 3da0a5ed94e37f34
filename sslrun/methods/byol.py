"""BYOL (Grill et al. 2020): an online network with a predictor regresses a momentum target."""

from dataclasses import dataclass

from sslrun.losses import byol_loss
from sslrun.methods.base import StepOutput
from sslrun.methods.online_target import OnlineTargetConfig, OnlineTargetMethod
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR

# Projector and predictor at toy sizes, for the generic tests (methods.registry).
HEADS = (*PROJECTOR, "method.predictor_mlp.hidden_dim=24", "method.predictor_mlp.out_dim=16")


@dataclass
class BYOLConfig(OnlineTargetConfig):
    pass


@register_method("byol", BYOLConfig, views=2, test_overrides=HEADS)
class BYOL(OnlineTargetMethod):
    """loss = l(p1, z2') + l(p2, z1') with l = 2 - 2 cos, p the online prediction of one view and
    z' the target projection of the other (the target: see OnlineTargetMethod)."""

    def training_loss(self, batch: dict) -> StepOutput:
        batch_size = batch["views"][0].shape[0]
        features, projections, (p1, p2), (t1, t2) = self.online_and_target(batch["views"])
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return StepOutput(loss, features[:batch_size], projections[:batch_size], self.target.metrics(self.global_step))

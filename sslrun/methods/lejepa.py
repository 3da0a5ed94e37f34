"""LeJEPA (Balestriero & LeCun 2025, "LeJEPA: Provable and Scalable Self-Supervised Learning
Without the Heuristics"): every view predicts the centre of the global views' embeddings, and
SIGReg keeps the embeddings an isotropic Gaussian. No teacher, stop-gradient or schedule."""

from dataclasses import dataclass, field

import torch
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import MLPSpec, Schema, require_positive
from sslrun.distributed import all_reduce_sum_with_grad
from sslrun.losses import lejepa_loss, random_directions
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR
from sslrun.models.heads import MLPHead
from sslrun.models.multicrop import crop_features


@dataclass
class LeJEPAConfig(Schema):
    name: str = MISSING
    global_crops: int = MISSING
    sigreg_weight: float = MISSING
    slices: int = MISSING
    t_max: float = MISSING
    knots: int = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)

    @classmethod
    def check(cls, cfg):
        m = cfg.method
        crops = sum(view.count for view in cfg.augmentation.views)
        require(1 <= m.global_crops <= crops, f"method.global_crops={m.global_crops}: must be between 1 and the "
                                              f"augmentation's {crops} crops (the first ones are the global crops)")
        require(0 <= m.sigreg_weight <= 1, f"method.sigreg_weight={m.sigreg_weight}: must be in [0, 1] (the paper: 0.05)")
        require_positive(m, "method", "slices", "t_max")
        require(m.knots >= 2, f"method.knots={m.knots}: the quadrature needs at least 2")


@register_method("lejepa", LeJEPAConfig, views=None, test_overrides=(*PROJECTOR, "method.slices=16"))
class LeJEPA(SSLMethod):
    """z = projector(backbone(crop)) for every crop (ResNets one batch per crop size, ViTs one
    packed sequence); `losses.lejepa_loss` on [crops, B, D]: each crop's z regresses the mean z of
    the first `global_crops` crops, and SIGReg tests each crop's z against N(0, I) along `slices`
    random directions drawn anew each step from a generator seeded with the step (the same on
    every process), its characteristic functions summed over processes: the global batch's.

    Logged: `prediction_loss` and `sigreg` (the paper's point: with this loss, the training loss
    tracks downstream accuracy)."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.cfg = cfg

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        features = crop_features(self.backbone, views)
        z = self.projector(torch.cat(features)).unflatten(0, (len(views), -1))
        directions = random_directions(z.shape[-1], self.cfg.slices, self.global_step, z.device)
        loss, prediction, sigreg = lejepa_loss(z, self.cfg.global_crops, directions, self.cfg.sigreg_weight,
                                               self.cfg.t_max, self.cfg.knots, all_reduce_sum_with_grad)
        return StepOutput(loss, features[0], z[0], {"prediction_loss": prediction.detach(), "sigreg": sigreg.detach()})

"""What BYOL and MoCo v3 share: an online network (backbone, projector, predictor) whose
predictions of one view are compared with a momentum target's projections of the other."""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from omegaconf import MISSING

from sslrun.config.schema import PredictorHeads, require_unit_interval
from sslrun.methods.base import SSLMethod
from sslrun.methods.teacher import MomentumTeacher
from sslrun.models.heads import MLPHead


@dataclass
class OnlineTargetConfig(PredictorHeads):
    name: str = MISSING
    momentum: float = MISSING
    final_momentum: float = MISSING

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require_unit_interval(cfg.method, "method", "momentum", "final_momentum")


class OnlineTargetMethod(SSLMethod):
    """The online network and its target, an EMA of the backbone and projector whose momentum
    rises from `momentum` to `final_momentum` on a cosine (methods.teacher.MomentumTeacher).
    A subclass gives the loss."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.predictor = MLPHead.from_spec(self.projector.out_dim, cfg.predictor_mlp)
        self.target = MomentumTeacher([self.backbone, self.projector], cfg.momentum, cfg.final_momentum,
                                      self.lr_schedule.total_steps)

    def online_and_target(self, views: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """(features, projections) of the online network over all views (one pass: BN statistics
        over both), its predictions per view, and the target's projections per view."""
        features = self.backbone(torch.cat(views))
        projections = self.projector(features)
        predictions = self.predictor(projections).chunk(len(views))
        with torch.no_grad():
            targets = self.target(torch.cat(views)).chunk(len(views))
        return features, projections, predictions, targets

    def after_optimizer_step(self) -> None:
        self.target.follow([self.backbone, self.projector], self.global_step)

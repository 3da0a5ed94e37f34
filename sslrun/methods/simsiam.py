"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives, no momentum encoder."""

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from sslrun.config.schema import PredictorHeads
from sslrun.losses import negative_cosine_similarity
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.byol import HEADS
from sslrun.methods.registry import register_method
from sslrun.models.heads import MLPHead


@dataclass
class SimSiamConfig(PredictorHeads):
    name: str = MISSING
    stop_gradient: bool = MISSING
    predictor: bool = MISSING
    fixed_predictor_lr: bool = MISSING


@register_method("simsiam", SimSiamConfig, views=2, test_overrides=HEADS)
class SimSiam(SSLMethod):
    """loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine similarity.

    The paper's ablations are switches: `stop_gradient=false` lets gradients through z (the
    paper's fig. 2: the representation collapses), `predictor=false` uses p = z (collapses too).
    `fixed_predictor_lr=true` trains the predictor at the peak lr without decay (the paper's
    default)."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.predictor = MLPHead.from_spec(self.projector.out_dim, cfg.predictor_mlp) if cfg.predictor else None
        self.stop_gradient, self.fixed_predictor_lr = cfg.stop_gradient, cfg.fixed_predictor_lr

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        features = self.backbone(torch.cat(views))
        z = self.projector(features)
        p1, p2 = (self.predictor(z) if self.predictor is not None else z).chunk(2)
        z1, z2 = z.chunk(2)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        loss = negative_cosine_similarity(p1, z2) / 2 + negative_cosine_similarity(p2, z1) / 2
        return StepOutput(loss, features[:batch_size], z[:batch_size])

    def optimizer_groups(self):
        if self.predictor is None or not self.fixed_predictor_lr:
            return super().optimizer_groups()
        rest = [(n, p) for n, p in self.named_parameters() if not n.startswith(("probe.", "predictor."))]
        return self._groups(rest) + self._groups(self.predictor.named_parameters(),
                                                 constant_lr=self.lr_schedule.peak)

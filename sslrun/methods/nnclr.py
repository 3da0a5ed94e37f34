"""NNCLR (Dwibedi et al. 2021): contrastive learning whose positive for a view is the nearest
neighbour of its projection in a support set of earlier projections."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import PredictorHeads, require_positive
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import nnclr_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.byol import HEADS
from sslrun.methods.registry import register_method
from sslrun.models.heads import MLPHead
from sslrun.models.queue import Queue


@dataclass
class NNCLRConfig(PredictorHeads):
    name: str = MISSING
    temperature: float = MISSING
    queue_size: int = MISSING

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require_positive(cfg.method, "method", "temperature")
        require(cfg.method.queue_size >= 1, f"method.queue_size={cfg.method.queue_size}: must be at least 1")


@register_method("nnclr", NNCLRConfig, views=2, test_overrides=(*HEADS, "method.queue_size=40"))
class NNCLR(SSLMethod):
    """z = projector(backbone(view)), p = predictor(z); each view's z is replaced by its nearest
    neighbour in the support set (`models.queue.Queue`, the projections of view 1 of the last
    `queue_size` images of the global batch, gathered in rank order so that every process holds
    the same set), which is contrasted with the other view's predictions over the global batch
    (losses.nnclr_loss). `train/nn_similarity` is the mean cosine similarity of z and its
    neighbour: near 1 means the support set holds close neighbours, not random rows."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.predictor = MLPHead.from_spec(self.projector.out_dim, cfg.predictor_mlp)
        self.support = Queue(cfg.queue_size, self.projector.out_dim)
        self.temperature = cfg.temperature

    def training_loss(self, batch: dict) -> StepOutput:
        features, (z1, z2) = self.project_views(batch["views"], self.projector)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)  # BN statistics over both views
        nn1, nn2 = self.support.nearest(z1), self.support.nearest(z2)
        loss = nnclr_loss(nn1, nn2, all_gather_with_grad(p1), all_gather_with_grad(p2), self.temperature,
                          offset=rank() * z1.shape[0])
        unit_z1 = F.normalize(z1.detach(), dim=1)
        similarity = (unit_z1 * nn1).sum(dim=1).mean()
        self.support.push(all_gather_with_grad(unit_z1))
        return StepOutput(loss, features[:z1.shape[0]], z1, {"nn_similarity": similarity})

"""SwAV (Caron et al. 2020): online clustering. The codes of each global crop, computed by
Sinkhorn-Knopp over the global batch, are predicted from every other crop (swapped prediction)."""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import MLPSpec, Schema, require_positive
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import entropy, sinkhorn_knopp, swav_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR
from sslrun.models.heads import MLPHead
from sslrun.models.multicrop import crop_features
from sslrun.models.queue import Queue


@dataclass
class SwAVConfig(Schema):
    name: str = MISSING
    temperature: float = MISSING
    sinkhorn_epsilon: float = MISSING
    sinkhorn_iterations: int = MISSING
    prototypes: int = MISSING
    assignment_crops: int = MISSING
    queue_size: int = MISSING
    queue_start_epochs: float = MISSING
    freeze_prototypes_epochs: float = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)

    @classmethod
    def check(cls, cfg):
        m = cfg.method
        require_positive(m, "method", "temperature", "sinkhorn_epsilon", "sinkhorn_iterations", "prototypes")
        crops = sum(view.count for view in cfg.augmentation.views)
        require(1 <= m.assignment_crops < crops,
                f"method.assignment_crops={m.assignment_crops}: must be at least 1 and fewer than the "
                f"augmentation's {crops} crops (each assignment crop is predicted from the others)")
        require(m.queue_size >= 0, f"method.queue_size={m.queue_size}: must be 0 (no queue) or more")
        require(m.queue_start_epochs >= 0 and m.freeze_prototypes_epochs >= 0,
                "method.queue_start_epochs and method.freeze_prototypes_epochs: must be 0 or more")


@register_method("swav", SwAVConfig, views=None,
                 test_overrides=(*PROJECTOR, "method.prototypes=12", "method.queue_size=32",
                                 "method.queue_start_epochs=0"))
class SwAV(SSLMethod):
    """z = normalize(projector(backbone(crop))) for every crop (ResNets one batch per crop size,
    ViTs one packed sequence), scores z C^T against the prototypes C (rows renormalised before
    each step, as in the reference code). The first `assignment_crops` crops (the global ones)
    get codes by Sinkhorn-Knopp over the scores of the whole global batch, gathered so that every
    process computes the same codes; with `queue_size` > 0, each assignment crop also keeps a
    `models.queue.Queue` of its last embeddings (from `queue_start_epochs` on), whose scores join
    the Sinkhorn columns once it holds only real rows: what small batches need to spread the
    prototypes. The prototypes stay fixed for the first `freeze_prototypes_epochs`.

    Logged: `code_entropy` (mean entropy of a sample's code: log K means it is spread over every
    prototype) and `prototypes_used` (how many prototypes are some sample's argmax this step)."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.prototypes = nn.Linear(self.projector.out_dim, cfg.prototypes, bias=False)
        self.temperature, self.epsilon, self.iterations = cfg.temperature, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations
        self.assignment_crops = cfg.assignment_crops
        self.queues = nn.ModuleList(Queue(cfg.queue_size, self.projector.out_dim)
                                    for _ in range(cfg.assignment_crops)) if cfg.queue_size else None
        self.queue_start_step = round(cfg.queue_start_epochs * self.steps_per_epoch)
        self.freeze_prototypes_steps = round(cfg.freeze_prototypes_epochs * self.steps_per_epoch)

    def queue_in_use(self, global_batch: int) -> bool:
        """The queue joins the Sinkhorn columns once every row is a real embedding: its pushes
        start at queue_start_step, one global batch per step."""
        if self.queues is None:
            return False
        return self.global_step - self.queue_start_step >= -(-len(self.queues[0]) // global_batch)

    def training_loss(self, batch: dict) -> StepOutput:
        views = batch["views"]
        batch_size = views[0].shape[0]
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        features = crop_features(self.backbone, views)
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        scores = self.prototypes(z).float().chunk(len(views))
        codes = []
        with torch.no_grad():  # one gather per assignment crop: its scores and its queue rows
            for crop in range(self.assignment_crops):
                embeddings = all_gather_with_grad(z[crop * batch_size:(crop + 1) * batch_size])
                columns = self.prototypes(embeddings).float()
                if self.queue_in_use(embeddings.shape[0]):
                    columns = torch.cat([self.prototypes(self.queues[crop].rows).float(), columns])
                batch_codes = sinkhorn_knopp(columns, self.epsilon, self.iterations)[-embeddings.shape[0]:]
                codes.append(batch_codes[rank() * batch_size:(rank() + 1) * batch_size])
                if self.queues is not None and self.global_step >= self.queue_start_step:
                    self.queues[crop].push(embeddings)
        loss = swav_loss(scores, codes, self.temperature)
        assigned = torch.cat(codes).argmax(dim=1)
        return StepOutput(loss, features[0], z[:batch_size], {
            "code_entropy": entropy(torch.cat(codes)),
            "prototypes_used": torch.tensor(float(assigned.unique().numel())),
        })

    def on_before_optimizer_step(self, optimizer) -> None:
        """The paper's first epoch with fixed prototypes: learning them from the start is unstable."""
        if self.global_step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

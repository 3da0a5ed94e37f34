"""MoCo v2 (He et al. 2020; Chen et al. 2020c): a momentum key encoder and a queue of negatives."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import MLPSpec, Schema, require_positive, require_unit_interval
from sslrun.distributed import all_gather_with_grad, shuffled_across_processes
from sslrun.losses import infonce_queue_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.simclr import PROJECTOR
from sslrun.methods.teacher import MomentumTeacher
from sslrun.models.heads import MLPHead
from sslrun.models.queue import Queue


@dataclass
class MoCoV2Config(Schema):
    name: str = MISSING
    temperature: float = MISSING
    momentum: float = MISSING
    queue_size: int = MISSING
    symmetric: bool = MISSING
    shuffle_bn: bool = MISSING
    projector: MLPSpec = field(default_factory=MLPSpec)

    @classmethod
    def check(cls, cfg):
        m = cfg.method
        require_positive(m, "method", "temperature")
        require_unit_interval(m, "method", "momentum")
        require(m.queue_size >= 1, f"method.queue_size={m.queue_size}: must be at least 1")


@register_method("mocov2", MoCoV2Config, views=2,
                 test_overrides=(*PROJECTOR, "method.queue_size=40"))
class MoCoV2(SSLMethod):
    """InfoNCE of each query against its key (the other view, through the momentum encoder) and
    the `queue_size` most recent keys (`models.queue.Queue`: the keys of the whole batch, gathered
    over processes in rank order, enter it after each step). `shuffle_bn` computes keys on a batch
    re-dealt over processes (the paper's guard against BN leaking the positive; with global BN it
    changes nothing). The key encoder's momentum is constant."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.key_encoder = MomentumTeacher([self.backbone, self.projector], cfg.momentum, cfg.momentum,
                                           self.lr_schedule.total_steps)
        self.queue = Queue(cfg.queue_size, self.projector.out_dim)
        self.temperature, self.symmetric, self.shuffle_bn = cfg.temperature, cfg.symmetric, cfg.shuffle_bn

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.shuffle_bn:
                return shuffled_across_processes(self.key_encoder, images)
            return self.key_encoder(images)

    def training_loss(self, batch: dict) -> StepOutput:
        v1, v2 = batch["views"]
        batch_size = v1.shape[0]
        negatives = self.queue.rows.clone()  # this step's; the queue takes the new keys below
        if self.symmetric:
            features = self.backbone(torch.cat([v1, v2]))
            q1, q2 = self.projector(features).chunk(2)
            k1, k2 = self.keys(v1), self.keys(v2)
            loss = (infonce_queue_loss(q1, k2, negatives, self.temperature)
                    + infonce_queue_loss(q2, k1, negatives, self.temperature)) / 2
            new_keys = torch.cat([k1, k2])
        else:
            features = self.backbone(v1)
            q1 = self.projector(features)
            k2 = self.keys(v2)
            loss = infonce_queue_loss(q1, k2, negatives, self.temperature)
            new_keys = k2
        self.queue.push(F.normalize(all_gather_with_grad(new_keys), dim=1))
        return StepOutput(loss, features[:batch_size], q1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written before the queue was its own module keep resuming."""
        state = checkpoint["state_dict"]
        for old, new in (("queue", "queue.rows"), ("queue_position", "queue.position")):
            if old in state:
                state[new] = state.pop(old)

    def after_optimizer_step(self) -> None:
        self.key_encoder.follow([self.backbone, self.projector], self.global_step)

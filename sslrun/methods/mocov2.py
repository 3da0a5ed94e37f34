"""MoCo v2 (He et al. 2020; Chen et al. 2020c): a momentum key encoder and a queue of negatives."""

import torch
import torch.nn.functional as F

from sslrun.distributed import all_gather_with_grad, shuffled_across_processes
from sslrun.losses import infonce_queue_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.ema import MomentumEncoder
from sslrun.models.heads import MLPHead


class MoCoV2(SSLMethod):
    """InfoNCE of each query against its key (the other view, through the momentum encoder) and
    the `queue_size` most recent keys. Keys of the whole batch (gathered over processes, in rank
    order) enter the queue after each step, so every process holds the same queue; it is a buffer
    and travels in checkpoints. `shuffle_bn` computes keys on a batch re-dealt over processes (the
    paper's guard against BN leaking the positive; with global BN it changes nothing)."""

    num_views = 2

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.projector = MLPHead.from_spec(self.backbone.num_features, cfg.projector)
        self.key_encoder = MomentumEncoder([self.backbone, self.projector])
        self.temperature, self.momentum = cfg.temperature, cfg.momentum
        self.symmetric, self.shuffle_bn = cfg.symmetric, cfg.shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, self.projector.out_dim), dim=1))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.shuffle_bn:
                return shuffled_across_processes(self.key_encoder, images)
            return self.key_encoder(images)

    def training_loss(self, batch: dict) -> StepOutput:
        v1, v2 = batch["views"]
        batch_size = v1.shape[0]
        queue = self.queue.clone()  # this step's negatives; the buffer is updated below
        if self.symmetric:
            features = self.backbone(torch.cat([v1, v2]))
            q1, q2 = self.projector(features).chunk(2)
            k1, k2 = self.keys(v1), self.keys(v2)
            loss = (infonce_queue_loss(q1, k2, queue, self.temperature)
                    + infonce_queue_loss(q2, k1, queue, self.temperature)) / 2
            self.enqueue(torch.cat([k1, k2]))
        else:
            features = self.backbone(v1)
            q1 = self.projector(features)
            k2 = self.keys(v2)
            loss = infonce_queue_loss(q1, k2, queue, self.temperature)
            self.enqueue(k2)
        return StepOutput(loss, features[:batch_size], q1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = F.normalize(all_gather_with_grad(keys), dim=1)[-self.queue.shape[0]:]
        slots = (self.queue_position + torch.arange(keys.shape[0], device=keys.device)) % self.queue.shape[0]
        self.queue[slots] = keys
        self.queue_position.copy_((self.queue_position + keys.shape[0]) % self.queue.shape[0])

    def after_optimizer_step(self) -> None:
        self.key_encoder.update([self.backbone, self.projector], self.momentum)

"""MoCo v3 (Chen, Xie & He 2021): in-batch contrast of a predictor output with momentum keys."""

from dataclasses import dataclass

from omegaconf import MISSING

from sslrun.config.errors import ConfigError
from sslrun.config.schema import require_positive
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import infonce_batch_loss
from sslrun.methods.base import StepOutput
from sslrun.methods.byol import HEADS
from sslrun.methods.online_target import OnlineTargetConfig, OnlineTargetMethod
from sslrun.methods.registry import register_method


@dataclass
class MoCoV3Config(OnlineTargetConfig):
    temperature: float = MISSING
    frozen_patch_embed: bool = MISSING

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require_positive(cfg.method, "method", "temperature")


@register_method("mocov3", MoCoV3Config, views=2, test_overrides=HEADS)
class MoCoV3(OnlineTargetMethod):
    """loss = ctr(q1, k2) + ctr(q2, k1): q the online predictor output, k the momentum encoder's
    projection of the other view, gathered over processes (the other keys of the global batch are
    the negatives), ctr scaled by 2T. `frozen_patch_embed=true` keeps a ViT's random patch
    projection fixed (the paper's sec. 5 stability trick; conf/method/mocov3_vit.yaml)."""

    def __init__(self, cfg, **base):
        super().__init__(cfg, **base)
        if cfg.frozen_patch_embed:
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ConfigError("method.frozen_patch_embed=true: the backbone has no patch embedding; use a ViT "
                                  "(backbone=vit_tiny_p4 for 28-32 px images, backbone=vit_small at 224 px)")
            patch_embed.requires_grad_(False)
        self.temperature = cfg.temperature

    def training_loss(self, batch: dict) -> StepOutput:
        batch_size = batch["views"][0].shape[0]
        features, projections, (q1, q2), keys = self.online_and_target(batch["views"])
        k1, k2 = (all_gather_with_grad(k) for k in keys)
        offset = rank() * batch_size
        loss = (infonce_batch_loss(q1, k2, self.temperature, offset)
                + infonce_batch_loss(q2, k1, self.temperature, offset))
        return StepOutput(loss, features[:batch_size], projections[:batch_size], self.target.metrics(self.global_step))

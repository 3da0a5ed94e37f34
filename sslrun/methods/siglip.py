"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): CLIP's dual encoder
with a pairwise sigmoid loss instead of the softmax over the batch."""

from dataclasses import dataclass

from omegaconf import MISSING

from sslrun.distributed import exchange_with_neighbours
from sslrun.losses import siglip_loss
from sslrun.methods.clip import CLIP, TEXT_TOWER, ImageTextConfig
from sslrun.methods.registry import register_method
from sslrun.models.heads import LogitScale


@dataclass
class SigLIPConfig(ImageTextConfig):
    logit_bias_init: float = MISSING


@register_method("siglip", SigLIPConfig, views=1, image_text=True, test_overrides=TEXT_TOWER)
class SigLIP(CLIP):
    """Every image-text pair is a binary match / no-match decision (`losses.siglip_loss`) with a
    learned scale (from 10) and bias (from -10, so that the many negatives start near zero loss).
    Across processes, text embeddings travel round the ring of neighbours
    (`distributed.exchange_with_neighbours`); no process gathers the whole batch."""

    def configure_loss(self, cfg) -> None:
        self.logit_scale = LogitScale(cfg.logit_scale_init, cfg.max_logit_scale, bias=cfg.logit_bias_init)

    def contrastive_loss(self, image, text, log_scale, bias):
        return siglip_loss(image, exchange_with_neighbours(text), log_scale, bias)

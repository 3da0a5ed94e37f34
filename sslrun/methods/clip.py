"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): an image tower and a text tower trained to pair images with their captions."""

from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.nn as nn
from omegaconf import MISSING
from torch.utils.checkpoint import checkpoint

from sslrun.config.errors import require
from sslrun.config.schema import Schema
from sslrun.config.validate import world_size
from sslrun.data.tokenizer import END_ID, VOCAB_SIZE
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import clip_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.models.heads import LogitScale
from sslrun.models.text import TextTransformer


@dataclass
class TextTowerSpec:
    """models.text.TextTransformer: a causal transformer over CLIP's BPE tokens."""

    context_length: int = MISSING
    width: int = MISSING
    layers: int = MISSING
    heads: int = MISSING


@dataclass
class ImageTextConfig(Schema):
    """What CLIP and SigLIP share: the towers, the shared space, the learned scale, prompts."""

    name: str = MISSING
    embed_dim: int = MISSING
    logit_scale_init: float = MISSING
    max_logit_scale: float = MISSING
    micro_batches: int = MISSING
    text: TextTowerSpec = field(default_factory=TextTowerSpec)
    prompts: List[str] = MISSING

    @classmethod
    def check(cls, cfg):
        m, t = cfg.method, cfg.trainer
        require(m.text.context_length >= 2,
                f"method.text.context_length={m.text.context_length}: must be at least 2 (start and end tokens)")
        require(m.text.width % m.text.heads == 0,
                f"method.text.width={m.text.width}: must divide by method.text.heads={m.text.heads}")
        require(1 <= m.logit_scale_init <= m.max_logit_scale,
                f"method.logit_scale_init={m.logit_scale_init}: must lie in [1, method.max_logit_scale="
                f"{m.max_logit_scale}]")
        require(len(m.prompts) > 0, "method.prompts: give at least one template, e.g. ['a photo of a {}.']")
        for prompt in m.prompts:
            require(prompt.count("{}") == 1,
                    f"method.prompts: {prompt!r} must hold the class name's place '{{}}' exactly once")
        require(t.accumulate_grad_batches == 1,
                f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: averaging micro-batch losses drops "
                f"negatives from method={m.name}'s loss; use method.micro_batches={t.accumulate_grad_batches} "
                f"instead (the same loss as one big batch, less activation memory)")
        world = world_size(cfg)
        per_process = cfg.data.batch_size // world
        require(m.micro_batches >= 1 and per_process % m.micro_batches == 0,
                f"method.micro_batches={m.micro_batches}: must divide the {per_process} images per process "
                f"(data.batch_size={cfg.data.batch_size} / {world} processes)")


@dataclass
class CLIPConfig(ImageTextConfig):
    local_loss: bool = MISSING


# Towers at toy sizes, for the generic tests (methods.registry).
TEXT_TOWER = ("method.text.width=32", "method.text.layers=2", "method.text.heads=2", "method.text.context_length=8",
              "method.embed_dim=16")


@register_method("clip", CLIPConfig, views=1, image_text=True, test_overrides=(*TEXT_TOWER, "method.micro_batches=2"))
class CLIP(SSLMethod):
    """Dual encoder: the backbone (timm) and a causal text transformer, each followed by a linear
    projection into a shared `embed_dim` space; symmetric InfoNCE over the global batch with a
    learned temperature (`losses.clip_loss`).

    `micro_batches` > 1 is gradient accumulation that keeps every negative: each tower runs its
    micro-batches without keeping activations (only the embeddings), the loss is computed over the
    whole batch, and the backward pass recomputes one micro-batch at a time with gradient (as
    GradCache, Gao et al. 2021). Peak activation memory is one micro-batch's; the loss and the
    gradients equal the whole batch's. Averaging micro-batch losses instead would shrink the set of
    negatives and change the loss."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        self.text_tower = TextTransformer(VOCAB_SIZE, cfg.text.context_length, cfg.text.width,
                                          cfg.text.layers, cfg.text.heads, END_ID)
        self.image_projection = nn.Linear(self.backbone.num_features, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.width**-0.5)
        self.micro_batches = cfg.micro_batches
        self.configure_loss(cfg)

    def configure_loss(self, cfg) -> None:
        """The learned temperature and the loss's own settings (SigLIP has its own)."""
        self.logit_scale = LogitScale(cfg.logit_scale_init, cfg.max_logit_scale)
        self.local_loss = cfg.local_loss

    # ------------------------------------------------------------------ towers
    def image_features_and_embedding(self, images: torch.Tensor):
        features = self.backbone(images)
        return features, self.image_projection(features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, embed_dim] (not normalised)."""
        return self.image_features_and_embedding(images)[1]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, embed_dim] (not normalised) of token ids [B, L]."""
        return self.text_projection(self.text_tower(tokens))

    def _in_micro_batches(self, encode: Callable, inputs: torch.Tensor):
        if self.micro_batches == 1 or not torch.is_grad_enabled():
            return encode(inputs)
        if inputs.shape[0] % self.micro_batches:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into {self.micro_batches} micro-batches")
        outputs = [checkpoint(encode, chunk, use_reentrant=False) for chunk in inputs.chunk(self.micro_batches)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)

    # ------------------------------------------------------------------ loss
    def contrastive_loss(self, image: torch.Tensor, text: torch.Tensor, log_scale, bias) -> torch.Tensor:
        image_all, text_all = all_gather_with_grad(image), all_gather_with_grad(text)
        if self.local_loss:  # this process's rows against all columns: B x N logits
            return clip_loss(image, text, log_scale, image_all, text_all, offset=rank() * image.shape[0])
        return clip_loss(image_all, text_all, log_scale)  # the whole N x N on every process

    def training_loss(self, batch: dict) -> StepOutput:
        features, image = self._in_micro_batches(self.image_features_and_embedding, batch["views"][0])
        text = self._in_micro_batches(self.encode_text, batch["text"])
        log_scale, bias = self.logit_scale()
        loss = self.contrastive_loss(image, text, log_scale, bias)
        metrics = {"logit_scale": log_scale.detach().exp()}
        if bias is not None:
            metrics["logit_bias"] = bias.detach()
        return StepOutput(loss, features, image, metrics)

    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_()

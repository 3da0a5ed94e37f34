"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): an image tower and a text tower trained to pair images with their captions."""

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from sslrun.data.tokenizer import END_ID, VOCAB_SIZE
from sslrun.distributed import all_gather_with_grad, rank
from sslrun.losses import clip_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.models.heads import LogitScale
from sslrun.models.text import TextTransformer


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

    num_views = 1
    image_text = True  # batches carry `text`; the data module captions and tokenizes

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

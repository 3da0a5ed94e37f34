"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"): a ViT encoder sees a
random 25% of the patches, a light decoder predicts the pixels of the others."""

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import torch
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import Schema, TokenPredictorSpec
from sslrun.distributed import rank, world_size
from sslrun.losses import mae_loss, patchify, unpatchify
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.models.predictor import NO_POSITION, TokenPredictor
from sslrun.models.vit import packed_forward, require_packing


@dataclass
class MAEConfig(Schema):
    name: str = MISSING
    mask_ratio: float = MISSING
    normalize_targets: bool = MISSING
    decoder: TokenPredictorSpec = field(default_factory=TokenPredictorSpec)

    @classmethod
    def check(cls, cfg):
        ratio = cfg.method.mask_ratio
        require(0 < ratio < 1, f"method.mask_ratio={ratio}: must be in (0, 1) (the paper: 0.75)")


@register_method("mae", MAEConfig, views=1,
                 test_overrides=("method.decoder.width=32", "method.decoder.depth=1", "method.decoder.heads=2"))
class MAE(SSLMethod):
    """Per image, `mask_ratio` of the patches are removed at random (the argsort of uniform noise,
    as in the reference code); the encoder (the backbone, with its class token) runs on the rest
    only, through the packed pass with `keep`; the decoder (`models.predictor.TokenPredictor`)
    takes the encoded tokens at their positions and a mask token at each removed one, and predicts
    the removed patches' pixels (`losses.mae_loss`, against per-patch normalised pixels).

    The noise is drawn for the whole global batch and each process takes its rows, so N processes
    mask each image as one process would. The online probe and the collapse monitor see the
    backbone's pooled feature of the masked input (the cheap feature of the step: with MAE's
    `global_pool: avg`, the mean of the visible patches' tokens); every evaluation embeds whole images."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        require_packing(self.backbone, "mae")
        embed = self.backbone.patch_embed
        self.patch = embed.patch_size[0]
        self.grid = tuple(embed.dynamic_feat_size(embed.img_size))
        self.patches = self.grid[0] * self.grid[1]
        self.visible = int(self.patches * (1 - cfg.mask_ratio))  # the reference code's len_keep
        require(self.visible >= 1, f"method.mask_ratio={cfg.mask_ratio}: keeps no patch of the {self.patches}")
        self.normalize_targets = cfg.normalize_targets
        channels = embed.proj.in_channels
        self.decoder = TokenPredictor(self.backbone.num_features, cfg.decoder.width, cfg.decoder.depth,
                                      cfg.decoder.heads, self.patch * self.patch * channels, self.grid,
                                      self.backbone.block_diagonal_attention)

    def random_masks(self, batch: int, device, generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(kept, removed) patch indices [B, visible] and [B, patches - visible], each sorted."""
        noise = torch.rand(batch * world_size(), self.patches, generator=generator)[rank() * batch:(rank() + 1) * batch]
        order = noise.argsort(dim=1).to(device)
        return order[:, :self.visible].sort(dim=1).values, order[:, self.visible:].sort(dim=1).values

    def reconstruct(self, images: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor):
        """(the backbone's pooled feature of the masked input [B, D], predicted pixels of the
        removed patches [B, removed, patch * patch * C])."""
        batch, prefix = images.shape[0], self.backbone.num_prefix_tokens
        encoded = packed_forward(self.backbone, [images], keep=[kept])[0]
        context_positions = torch.cat([torch.full((batch, prefix), NO_POSITION, device=kept.device), kept + 1], 1)
        per_image = prefix + kept.shape[1]
        predictions = self.decoder(encoded, context_positions.flatten(), (per_image,) * batch,
                                   (removed + 1).flatten(), (removed.shape[1],) * batch)
        pooled = self.backbone.forward_head(encoded.view(batch, per_image, -1), pre_logits=True)
        return pooled, predictions.view(batch, removed.shape[1], -1)

    def training_loss(self, batch: dict) -> StepOutput:
        images = batch["views"][0]
        kept, removed = self.random_masks(images.shape[0], images.device)
        pooled, predictions = self.reconstruct(images, kept, removed)
        targets = _rows(patchify(images, self.patch), removed)
        loss = mae_loss(predictions, targets, self.normalize_targets)
        return StepOutput(loss, pooled, pooled)

    @torch.no_grad()
    def method_pictures(self, images: torch.Tensor, inputs: torch.Tensor, augment) -> Dict[str, object]:
        """Rows of (image, what the encoder saw, reconstruction) for held-out images (uint8
        `images`, their normalised `inputs`), with a fixed mask. The visible patches are the
        image's own. With normalised targets a prediction has no brightness or contrast of its own:
        it is shown with the true patch's mean and variance, as the paper's figures are."""
        from sslrun.eval.pictures import grid

        kept, removed = self.random_masks(images.shape[0], inputs.device, torch.Generator().manual_seed(0))
        _, predictions = self.reconstruct(inputs, kept, removed)
        predictions = predictions.float()
        pixels = patchify(images.float().to(inputs.device), self.patch)
        index = removed[..., None].expand(-1, -1, pixels.shape[-1])
        if self.normalize_targets:
            truth = _rows(pixels, removed)
            filled = pixels.scatter(1, index, predictions * (truth.var(-1, keepdim=True) + 1e-6).sqrt()
                                    + truth.mean(-1, keepdim=True))
        else:  # predicted normalised inputs: back through the data's normalisation
            normalized = patchify(inputs.float(), self.patch).scatter(1, index, predictions)
            image = self._image(normalized) * augment.std.to(inputs.device) + augment.mean.to(inputs.device)
            filled = patchify(image * 255.0, self.patch)
        masked = pixels.scatter(1, index, torch.full_like(predictions, 127.0))
        rows = [self._image(p).clamp(0, 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                for p in (pixels, masked, filled)]
        return {"reconstruction": grid([[np.ascontiguousarray(r[i]) for r in rows] for i in range(len(images))])}

    def _image(self, patches: torch.Tensor) -> torch.Tensor:
        channels = patches.shape[-1] // (self.patch * self.patch)
        return unpatchify(patches, self.patch, self.grid, channels)


def _rows(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """patches [B, N, P] at index [B, M] -> [B, M, P]."""
    return patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))

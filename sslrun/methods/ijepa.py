"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture"): from one context block of an image, predict the representations a
momentum target encoder gives several target blocks of the same image. No augmentation but a crop,
no pixels, no negatives."""

import random
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch
from omegaconf import MISSING

from sslrun.config.errors import require
from sslrun.config.schema import Schema, TokenPredictorSpec, require_unit_interval
from sslrun.data.masking import ContextAndTargets, MultiBlock
from sslrun.distributed import all_reduce_sum, world_size
from sslrun.losses import ijepa_loss
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.registry import register_method
from sslrun.methods.teacher import MomentumTeacher
from sslrun.models.attention import Packing
from sslrun.models.predictor import NO_POSITION, TokenPredictor
from sslrun.models.vit import packed_forward, patch_tokens, require_packing


@dataclass
class IJEPAConfig(Schema):
    name: str = MISSING
    targets: int = MISSING
    target_scale: List[float] = MISSING
    target_aspect: List[float] = MISSING
    context_scale: List[float] = MISSING
    loss: str = MISSING
    momentum: float = MISSING
    final_momentum: float = MISSING
    predictor: TokenPredictorSpec = field(default_factory=TokenPredictorSpec)

    @classmethod
    def check(cls, cfg):
        m = cfg.method
        require(cfg.backbone.attention is not None,
                f"method=ijepa: backbone={cfg.backbone.name} is not a ViT; I-JEPA predicts patch tokens "
                f"(backbone=vit_small, vit_base, ...)")
        require(m.targets >= 1, f"method.targets={m.targets}: at least 1 (the paper: 4)")
        for key in ("target_scale", "context_scale", "target_aspect"):
            low, high = (list(m[key]) + [None, None])[:2]
            require(len(m[key]) == 2 and 0 < low <= high and (key == "target_aspect" or high <= 1),
                    f"method.{key}={list(m[key])}: need [low, high] with 0 < low <= high"
                    f"{'' if key == 'target_aspect' else ' <= 1'}")
        require(m.targets * m.target_scale[1] < 1,
                f"method.targets={m.targets} x method.target_scale[1]={m.target_scale[1]}: the targets could cover "
                f"the whole image and leave no context; fewer or smaller targets")
        require(m.loss in ("smooth_l1", "l2"), f"method.loss={m.loss}: smooth_l1 (the reference code's) or l2 "
                                               f"(the paper's)")
        require_unit_interval(m, "method", "momentum", "final_momentum")
        TokenPredictorSpec.check_spec(m.predictor, "method.predictor")


@register_method("ijepa", IJEPAConfig, views=1,
                 test_overrides=("method.predictor.width=32", "method.predictor.depth=1", "method.predictor.heads=2"))
class IJEPA(SSLMethod):
    """Per image `data.masking.MultiBlock` draws `targets` target blocks and a context block
    without them. The context encoder (the backbone) runs on the context patches only (the packed pass
    with `keep`); the target encoder, an EMA of it (`momentum` -> `final_momentum` on a cosine),
    runs on the whole image. For each (image, target block) the predictor
    (`models.predictor.TokenPredictor`, output at the encoder's width) takes the context tokens at
    their positions and a mask token at each target position, and `losses.ijepa_loss` regresses
    the target encoder's layer-normalised tokens there. Every (image, block) is one segment of one
    packed sequence, whatever its length: nothing is padded or truncated.

    The loader's workers draw each image's masks from its sample generator (seed, epoch, index;
    `sample_masks`) and the batch brings them packed, so N processes mask each image as one process
    would, a resumed run draws the masks it would have drawn, and the step waits for no mask
    drawing or per-mask copies. The loss is averaged over the global batch's target patches
    (processes hold different counts). The online probe, the collapse monitor and
    every evaluation see the target encoder (the paper evaluates it), its patch tokens averaged:
    the YAML builds the ViT without a class token, as the paper's is."""

    def __init__(self, cfg, **base):
        super().__init__(**base)
        require_packing(self.backbone, "ijepa")
        self.cfg = cfg
        embed = self.backbone.patch_embed
        self.grid = tuple(embed.dynamic_feat_size(embed.img_size))
        self.sample_masks = MultiBlock(self.grid, cfg.targets, tuple(cfg.target_scale), tuple(cfg.target_aspect),
                                       tuple(cfg.context_scale))
        width = self.backbone.num_features
        self.predictor = TokenPredictor(width, cfg.predictor.width, cfg.predictor.depth, cfg.predictor.heads,
                                        width, self.grid, self.backbone.block_diagonal_attention)
        self.target = MomentumTeacher([self.backbone], cfg.momentum, cfg.final_momentum,
                                      self.lr_schedule.total_steps)

    @property
    def eval_backbone(self):
        return self.target.encoder[0]

    def draw_masks(self, images: int, rng: random.Random) -> List[ContextAndTargets]:
        """Masks for `images` images drawn one after another from `rng` (pictures, benchmarks)."""
        return [self.sample_masks.draw(rng) for _ in range(images)]

    def predict(self, images: torch.Tensor, packed: dict) -> torch.Tensor:
        """The predictor's outputs at every target patch of the batch's packed masks, [sum of the
        blocks' sizes, D]: image by image, block by block, each block's patches in its order. The
        rows are counted on the host from the masks' lengths: a few index transfers per step, not
        a few per image and block."""
        device, prefix = images.device, self.backbone.num_prefix_tokens
        context, counts = packed["context"].to(device), packed["context_lengths"]
        encoded = packed_forward(self.backbone, [images], keep=[list(torch.split(context, counts))])[0]
        # `encoded`, image by image: its prefix tokens, then its context tokens.
        parts = Packing(tuple(length for count in counts for length in (prefix, count)))
        positions = torch.full((parts.total,), NO_POSITION, dtype=context.dtype, device=device)
        positions[parts.token_index(torch.arange(1, 2 * len(counts), 2)).to(device)] = context + 1
        # One segment per (image, block): the image's rows of `encoded`, then the block's queries.
        per_image = Packing(tuple(prefix + count for count in counts))
        rows = per_image.token_index(torch.arange(len(counts)).repeat_interleave(self.cfg.targets)).to(device)
        return self.predictor(encoded[rows], positions[rows],
                              [prefix + count for count in counts for _ in range(self.cfg.targets)],
                              packed["targets"].to(device) + 1, packed["target_lengths"])

    def target_tokens(self, images: torch.Tensor, packed: dict):
        """(the target encoder's patch tokens at every target patch, in `predict`'s order, picked
        with one index of the batch's packed masks; its patch tokens averaged per image, the
        evaluated feature)."""
        backbone = self.eval_backbone
        with torch.no_grad():
            tokens = patch_tokens(backbone, packed_forward(backbone, [images])[0])
        lengths = packed["target_lengths"]
        per_image = [sum(lengths[i:i + self.cfg.targets]) for i in range(0, len(lengths), self.cfg.targets)]
        image = torch.repeat_interleave(torch.arange(len(images), device=tokens.device),
                                        torch.tensor(per_image, device=tokens.device), output_size=sum(lengths))
        return tokens[image, packed["targets"].to(tokens.device)], tokens.mean(dim=1)

    def training_loss(self, batch: dict) -> StepOutput:
        images, packed = batch["views"][0], batch["masks"]
        targets, pooled = self.target_tokens(images, packed)
        local_patches = torch.tensor(float(sum(packed["target_lengths"])), device=images.device)
        patches = all_reduce_sum(local_patches) / world_size()
        loss = ijepa_loss(self.predict(images, packed), targets, self.cfg.loss, patches)
        context = torch.tensor(packed["context_lengths"], dtype=torch.float).mean()
        return StepOutput(loss, pooled, pooled, {**self.target.metrics(self.global_step), "context_patches": context})

    def after_optimizer_step(self) -> None:
        self.target.follow([self.backbone], self.global_step)

    @torch.no_grad()
    def method_pictures(self, images: torch.Tensor, inputs: torch.Tensor, augment) -> Dict[str, object]:
        """Rows of (image, its context, its target blocks) for held-out images with fixed masks:
        the context's patches as they are and the rest grey; each target block tinted a colour
        of its own (overlaps take the later one)."""
        from sslrun.eval.pictures import grid

        masks = self.draw_masks(images.shape[0], random.Random(0))
        patch = self.backbone.patch_embed.patch_size[0]

        def pixels(indices: torch.Tensor) -> np.ndarray:  # the patches' pixels, [H, W, 1] (bool)
            cells = np.zeros(self.grid[0] * self.grid[1], dtype=bool)
            cells[indices.numpy()] = True
            return np.kron(cells.reshape(self.grid), np.ones((patch, patch), dtype=bool))[..., None]

        rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        rows = []
        for image, mask in zip(rgb, masks):
            context = np.where(pixels(mask.context), image, 127.0)
            tinted = image * 0.35
            for colour, block in zip(_COLOURS * len(mask.targets), mask.targets):
                tinted = np.where(pixels(block), 0.5 * image + 0.5 * colour, tinted)
            rows.append([np.ascontiguousarray(x.clip(0, 255).round().astype(np.uint8)) for x in (image, context, tinted)])
        return {"context_and_targets": grid(rows)}


_COLOURS = [np.array(c, dtype=np.float32) for c in ((230, 60, 60), (60, 170, 60), (60, 100, 230), (230, 180, 40))]

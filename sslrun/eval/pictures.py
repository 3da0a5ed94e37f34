"""Pictures of what a ViT learned: class-token attention maps (DINO, fig. 1) and the PCA of patch
features shown as RGB (DINOv2, fig. 1). Pure functions: images in, PIL images out."""

from typing import List

import numpy as np
import torch
import torch.nn as nn
from PIL import Image



@torch.no_grad()
def class_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention from the class token to every patch, per head:
    softmax(q_cls . k_j / sqrt(d)) over all tokens, kept for the patches; [B, heads, gh, gw].

    q and k are read from the model's own forward (hooks on the last attention's q/k norms), so
    the picture works on any attention backend and on a sharded model."""
    attn = vit.blocks[-1].attn
    captured = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, out))
             for name, module in (("q", attn.q_norm), ("k", attn.k_norm))]
    try:
        vit.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    q, k = captured["q"], captured["k"]  # [B, heads, tokens, head_dim]
    weights = (q[:, :, :1] * attn.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    grid = vit.patch_embed.dynamic_feat_size(images.shape[-2:])
    return weights[:, :, vit.num_prefix_tokens:].reshape(images.shape[0], attn.num_heads, *grid)


@torch.no_grad()
def patch_pca(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The first 3 principal components of all patch features of the batch, each scaled to [0, 1]
    over the batch, as RGB: [B, gh, gw, 3]. Matching parts get matching colours across images;
    non-finite features (a diverged model) give black, where the SVD would fail."""
    tokens = vit.forward_features(images)[:, vit.num_prefix_tokens:].float()
    batch, patches, dim = tokens.shape
    grid = vit.patch_embed.dynamic_feat_size(images.shape[-2:])
    if not torch.isfinite(tokens).all():
        return tokens.new_zeros(batch, *grid, 3)
    with torch.autocast(images.device.type, enabled=False):  # fp32 PCA under a bf16/fp16 run too
        flat = tokens.reshape(-1, dim)
        flat = flat - flat.mean(dim=0)
        _, _, v = torch.linalg.svd(flat, full_matrices=False)
        components = flat @ v[:3].t()
        low, high = components.min(dim=0).values, components.max(dim=0).values
        rgb = (components - low) / (high - low).clamp_min(1e-8)
    return rgb.reshape(batch, *grid, 3)


# A perceptually ordered dark-to-bright colour map (anchors of matplotlib's "inferno").
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """[h, w] values -> uint8 RGB [h, w, 3], scaled to the map's range per picture (non-finite
    values as the map's dark end)."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    span = values.max() - values.min()
    scaled = (values - values.min()) / (span if span > 0 else 1.0) * (len(_INFERNO) - 1)
    low = np.floor(scaled).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (scaled - low)[..., None]
    return (_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).round().astype(np.uint8)


def _tile(array: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(array if array.ndim == 3 and array.shape[2] == 3 else array.squeeze())
    return image.convert("RGB").resize((size, size), Image.NEAREST)


def grid(rows: List[List[np.ndarray]], tile: int = 96, gap: int = 2) -> Image.Image:
    """Arrange uint8 pictures ([h, w], [h, w, 1] or [h, w, 3]) in rows, each tile `tile` px."""
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * (tile + gap) + gap, len(rows) * (tile + gap) + gap), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            canvas.paste(_tile(picture, tile), (gap + c * (tile + gap), gap + r * (tile + gap)))
    return canvas


def _hwc(images: torch.Tensor) -> List[np.ndarray]:
    return [image.permute(1, 2, 0).cpu().numpy() for image in images]


def attention_picture(images: torch.Tensor, attention: torch.Tensor) -> Image.Image:
    """Rows: each image (uint8 [C, H, W]) followed by its class-token attention in every head."""
    return grid([[image] + [colorize(head.cpu().numpy()) for head in heads]
                 for image, heads in zip(_hwc(images), attention)])


def pca_picture(images: torch.Tensor, rgb: torch.Tensor) -> Image.Image:
    """Two rows: the images (uint8 [C, H, W]) and their patch-feature PCA colours."""
    return grid([_hwc(images), [(p.cpu().numpy() * 255).round().astype(np.uint8) for p in rgb]])

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, patches, patch * patch * C], patches row-major over the grid (the
    order of a ViT's patch tokens), each patch's pixels row-major with the channels last."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), -1)


def unpatchify(patches: torch.Tensor, patch: int, grid, channels: int) -> torch.Tensor:
    """The inverse of `patchify`: [B, gh * gw, patch * patch * C] -> [B, C, gh * patch, gw * patch]."""
    batch = patches.shape[0]
    x = patches.reshape(batch, grid[0], grid[1], patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid[0] * patch, grid[1] * patch)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch to zero mean and unit variance over its pixels (MAE's `norm_pix_loss` target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(predictions: torch.Tensor, targets: torch.Tensor, normalize_targets: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss (He et al. 2022, sec. 3), on the masked patches only:

        L = 1/|M| sum_{i in M} 1/P sum_j (x_hat_ij - t_ij)^2,
        t_i = (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-6)   (normalize_targets, the paper's default)
        t_i = x_i                                         (otherwise)

    `predictions` and `targets` [..., P]: one row per masked patch (x_i its P pixel values). Every
    image masks the same number of patches, so the mean over processes is the global batch's."""
    targets = normalize_patches(targets) if normalize_targets else targets
    return (predictions.float() - targets.float()).pow(2).mean()

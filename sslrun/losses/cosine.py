import torch
import torch.nn.functional as F


def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -(p / |p|) . (z / |z|), averaged over the batch (Chen & He 2021, eq. 1).

    The stop-gradient on z is the caller's decision (SimSiam's ablation turns it off)."""
    return -F.cosine_similarity(p, z, dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): the squared distance of l2-normalised
    prediction and target, |p/|p| - z/|z||^2 = 2 - 2 cos(p, z), averaged over the batch."""
    return 2 + 2 * negative_cosine_similarity(p, z)

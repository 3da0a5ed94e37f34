"""Collapse signals of an embedding batch, logged by every method."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of l2-normalised embeddings (SimSiam, sec. 4.1):
    about 1/sqrt(d) for embeddings spread over the sphere, 0 when all collapse to one point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """exp of the entropy of the normalised singular values of the batch (Roy & Vetterli 2007;
    RankMe, Garrido et al. 2023): between 1 (collapsed to a line) and min(batch, d); nan for
    non-finite input (where the SVD would not converge)."""
    if not torch.isfinite(z).all():
        return torch.tensor(float("nan"))
    singular = torch.linalg.svdvals(z.float())
    p = singular / singular.sum() + eps
    return torch.exp(-(p * p.log()).sum())

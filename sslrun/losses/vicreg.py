from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from sslrun.losses.barlow_twins import off_diagonal


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """VICReg (Bardes, Ponce & LeCun 2022, eq. 1-6) over a batch of N pairs of D-dim embeddings:

        s(Z, Z') = mean_b |z_b - z'_b|^2 / D                       invariance (MSE)
        v(Z)     = mean_j max(0, 1 - sqrt(Var(z_.j) + eps))         variance hinge on the std
        c(Z)     = sum_{i != j} Cov(Z)_ij^2 / D                     covariance, unbiased Cov

        L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]

    with (lambda, mu, nu) = (25, 25, 1). z1, z2: the *global* batch [N, D], gathered with gradient
    by the caller, so variance and covariance are statistics of the whole batch. Returns the loss
    and its three terms.
    """
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)
    std1, std2 = torch.sqrt(z1.var(dim=0) + eps), torch.sqrt(z2.var(dim=0) + eps)
    variance = (F.relu(1 - std1).mean() + F.relu(1 - std2).mean()) / 2
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)
    covariance = off_diagonal(cov1).pow(2).sum() / d + off_diagonal(cov2).pow(2).sum() / d
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return loss, {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}

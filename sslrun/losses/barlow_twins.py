import torch


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension (z - mean) / sqrt(var + eps) over the batch: BatchNorm1d without affine."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1-2). With each dimension standardised over the
    batch of N pairs, C_ij = sum_b z1_bi z2_bj / N is the cross-correlation matrix and

        L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2

    z1, z2: the projector outputs of the two views over the *global* batch [N, D] (gathered with
    gradient by the caller), so the statistics are those of the whole batch.
    """
    n = z1.shape[0]
    c = standardize(z1).T @ standardize(z2) / n
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diagonal + lambd * off_diagonal(c).pow(2).sum()

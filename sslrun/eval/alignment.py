"""Alignment and uniformity of l2-normalised features (Wang & Isola 2020, eq. 4 and 5; their
reference code), label-free measures of a representation:

    alignment   E_(x, x') ||f(x) - f(x')||_2^alpha          over positive pairs (two views of an image)
    uniformity  log E_(x, y) exp(-t ||f(x) - f(y)||_2^2)     over all pairs of distinct images

Lower is better for both: positives close together, features spread over the sphere (features
spread uniformly over a high-dimensional sphere have ||u - v||^2 near 2: uniformity near -2t).
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """x [N, D], y [N, D]: row i of each, the features of two views of image i."""
    return (F.normalize(x.float(), dim=1) - F.normalize(y.float(), dim=1)).norm(dim=1).pow(alpha).mean().item()


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """x [N, D]: features of N distinct images (each unordered pair counted once, as torch.pdist)."""
    return torch.pdist(F.normalize(x.float(), dim=1), p=2).pow(2).mul(-t).exp().mean().log().item()

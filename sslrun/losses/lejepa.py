from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def random_directions(dim: int, count: int, seed: int, device) -> torch.Tensor:
    """[dim, count] unit columns drawn from N(0, I) by a generator seeded with `seed` (the step):
    the same slices on every process with no communication, new ones each step."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, count, generator=generator).to(device)
    return directions / directions.norm(dim=0, keepdim=True)


def sigreg_loss(z: torch.Tensor, directions: torch.Tensor, t_max: float = 3.0, knots: int = 17,
                sum_over_processes: Reduce = _identity) -> torch.Tensor:
    """SIGReg, LeJEPA's sketched isotropic Gaussian test (Balestriero & LeCun 2025, sec. 4, alg. 1).

    Each embedding z_n [..., N, D] is projected on M unit directions a_m; per direction, the
    empirical characteristic function of the N projections is compared with the standard normal's
    by the Epps-Pulley statistic, integrated over t with the Gaussian window:

        phi_m(t) = 1/N sum_n exp(i t a_m . z_n),
        EP_m = N * integral_{-t_max}^{t_max} |phi_m(t) - exp(-t^2 / 2)|^2 exp(-t^2 / 2) dt,
        SIGReg = mean over m (and over the leading dimensions, views) of EP_m.

    The integrand is even in t: it is integrated over [0, t_max] with `knots` trapezoid knots and
    doubled (the reference code's quadrature). `sum_over_processes` sums the characteristic
    functions' cos and sin parts and the count N over processes (differentiably), so the
    statistic is the global batch's."""
    t = torch.linspace(0, t_max, knots, device=z.device, dtype=torch.float32)
    window = torch.exp(-t.square() / 2)
    step = t_max / (knots - 1)
    weights = torch.full_like(t, 2 * step)
    weights[[0, -1]] = step
    x = (z.float() @ directions.float()).unsqueeze(-1) * t  # [..., N, M, knots]
    count = sum_over_processes(torch.tensor(float(z.shape[-2]), device=z.device))
    cos = sum_over_processes(x.cos().sum(dim=-3)) / count
    sin = sum_over_processes(x.sin().sum(dim=-3)) / count
    error = (cos - window).square() + sin.square()
    return ((error @ (weights * window)) * count).mean()


def lejepa_loss(views: torch.Tensor, global_views: int, directions: torch.Tensor, sigreg_weight: float,
                t_max: float = 3.0, knots: int = 17, sum_over_processes: Reduce = _identity):
    """LeJEPA's objective (sec. 5, alg. 1) on the projections of every view, [V, N, D], the
    `global_views` first: each view predicts the centre of the global views, and SIGReg keeps each
    view's embeddings an isotropic Gaussian:

        L = (1 - lambda) * mean_{v, n, d} (mean_g z_g,n,d - z_v,n,d)^2 + lambda * SIGReg(z).

    Returns (loss, prediction term, SIGReg term)."""
    centres = views[:global_views].mean(dim=0)
    prediction = (centres - views).square().mean()
    sigreg = sigreg_loss(views, directions, t_max, knots, sum_over_processes)
    return (1 - sigreg_weight) * prediction + sigreg_weight * sigreg, prediction, sigreg

import math

import torch

from sslrun.losses import nt_xent_loss


def nt_xent_by_hand(z1, z2, temperature):
    """Eq. 1 of SimCLR written out with loops: 2N anchors, positive = the other view."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) / temperature for k in range(2 * n)]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_hand_computation():
    torch.manual_seed(0)
    for temperature in (0.1, 0.5, 1.0):
        z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
        assert math.isclose(nt_xent_loss(z1, z2, temperature).item(), nt_xent_by_hand(z1, z2, temperature),
                            rel_tol=1e-5)


def test_nt_xent_closed_form_for_orthogonal_pairs():
    # Two images, views identical, the two images orthogonal: s(i, p) = 1, other s = 0.
    z1 = torch.eye(2)
    loss = nt_xent_loss(z1, z1.clone(), temperature=0.5)
    expected = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(0)))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_local_anchors_against_gathered_candidates_average_to_global_loss():
    """What each process computes (its rows vs the gathered batch) averages to the full loss."""
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    full = nt_xent_loss(z1, z2, 0.2)
    shards = [
        nt_xent_loss(z1[r * 2:(r + 1) * 2], z2[r * 2:(r + 1) * 2], 0.2, z1, z2, offset=r * 2)
        for r in range(4)
    ]
    assert torch.allclose(torch.stack(shards).mean(), full, atol=1e-6)


def test_nt_xent_is_scale_invariant_and_symmetric():
    torch.manual_seed(2)
    z1, z2 = torch.randn(6, 3), torch.randn(6, 3)
    base = nt_xent_loss(z1, z2, 0.3)
    assert torch.allclose(nt_xent_loss(3 * z1, 0.5 * z2, 0.3), base, atol=1e-6)
    assert torch.allclose(nt_xent_loss(z2, z1, 0.3), base, atol=1e-6)

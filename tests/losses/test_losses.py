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


# ------------------------------------------------------------------ the method family's losses
from sslrun.losses import (  # noqa: E402
    barlow_twins_loss, byol_loss, infonce_batch_loss, infonce_queue_loss, negative_cosine_similarity, nnclr_loss, vicreg_loss,
)


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def test_infonce_queue_by_hand():
    torch.manual_seed(3)
    q, k, queue = torch.randn(4, 5).double(), torch.randn(4, 5).double(), torch.randn(6, 5).double()
    t = 0.2
    expected = 0.0
    for i in range(4):
        positive = math.exp(cos(q[i], k[i]) / t)
        negatives = sum(math.exp(cos(q[i], n) / t) for n in queue)
        expected += -math.log(positive / (positive + negatives))
    assert math.isclose(infonce_queue_loss(q, k, queue, t).item(), expected / 4, rel_tol=1e-9)


def test_infonce_queue_temperature_and_queue_contents_matter():
    torch.manual_seed(4)
    q, k, queue = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    assert not math.isclose(infonce_queue_loss(q, k, queue, 0.2).item(), infonce_queue_loss(q, k, queue, 0.5).item())
    # 7 queued copies of the positive: each is as likely as the positive itself, loss = log 8.
    aligned = torch.tensor([[1.0, 0, 0, 0]])
    assert math.isclose(infonce_queue_loss(aligned, aligned, aligned.repeat(7, 1), 0.2).item(), math.log(8), rel_tol=1e-6)
    # Orthogonal negatives: exp(1/T) / (exp(1/T) + 7) by hand.
    orthogonal = torch.tensor([[0.0, 1, 0, 0]]).repeat(7, 1)
    expected = -math.log(math.exp(5) / (math.exp(5) + 7))
    assert math.isclose(infonce_queue_loss(aligned, aligned, orthogonal, 0.2).item(), expected, rel_tol=1e-6)


def test_infonce_batch_by_hand_with_2t_scale_and_offset():
    torch.manual_seed(5)
    q, k_all = torch.randn(3, 4).double(), torch.randn(6, 4).double()
    t, offset = 0.2, 3  # this process holds rows 3..5 of the gathered keys
    expected = 0.0
    for i in range(3):
        logits = [cos(q[i], k) / t for k in k_all]
        expected += -math.log(math.exp(logits[offset + i]) / sum(math.exp(x) for x in logits))
    expected = 2 * t * expected / 3
    assert math.isclose(infonce_batch_loss(q, k_all, t, offset).item(), expected, rel_tol=1e-9)


def test_cosine_losses_by_hand():
    p, z = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert math.isclose(negative_cosine_similarity(p, z).item(), -(0.0 + 1.0) / 2, abs_tol=1e-7)
    assert math.isclose(byol_loss(p, z).item(), ((2 - 0.0) + (2 - 2.0)) / 2, abs_tol=1e-6)
    # BYOL's loss is the squared distance of the normalised vectors
    torch.manual_seed(6)
    p, z = torch.randn(5, 3), torch.randn(5, 3)
    direct = (torch.nn.functional.normalize(p, dim=1) - torch.nn.functional.normalize(z, dim=1)).pow(2).sum(1).mean()
    assert torch.allclose(byol_loss(p, z), direct, atol=1e-6)


def test_barlow_twins_by_hand():
    torch.manual_seed(7)
    z1, z2 = torch.randn(8, 3).double(), torch.randn(8, 3).double()
    lambd = 0.0051

    def standardize(z):
        columns = []
        for j in range(z.shape[1]):
            col = z[:, j]
            mean = sum(col) / len(col)
            var = sum((x - mean) ** 2 for x in col) / len(col)
            columns.append([(x - mean) / math.sqrt(var + 1e-5) for x in col])
        return columns  # [D][N]

    a, b = standardize(z1), standardize(z2)
    c = [[sum(a[i][n] * b[j][n] for n in range(8)) / 8 for j in range(3)] for i in range(3)]
    expected = sum((1 - c[i][i]) ** 2 for i in range(3)) + lambd * sum(
        c[i][j] ** 2 for i in range(3) for j in range(3) if i != j)
    assert math.isclose(barlow_twins_loss(z1, z2, lambd).item(), float(expected), rel_tol=1e-9)


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # unit variance, uncorrelated
    assert barlow_twins_loss(z, z.clone()).item() < 1e-4


def test_vicreg_terms_by_hand():
    torch.manual_seed(8)
    z1, z2 = torch.randn(6, 3).double() * 0.5, torch.randn(6, 3).double() * 2.0
    n, d = 6, 3
    invariance = float(((z1 - z2) ** 2).sum() / (n * d))

    def variance_and_covariance(z):
        mean = z.mean(0)
        centred = z - mean
        cov = [[float((centred[:, i] * centred[:, j]).sum() / (n - 1)) for j in range(d)] for i in range(d)]
        variance = sum(max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d
        covariance = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return variance, covariance

    v1, c1 = variance_and_covariance(z1)
    v2, c2 = variance_and_covariance(z2)
    loss, terms = vicreg_loss(z1, z2)
    assert math.isclose(terms["invariance"].item(), invariance, rel_tol=1e-9)
    assert math.isclose(terms["variance"].item(), (v1 + v2) / 2, rel_tol=1e-9)
    assert math.isclose(terms["covariance"].item(), c1 + c2, rel_tol=1e-9)
    assert math.isclose(loss.item(), 25 * invariance + 25 * (v1 + v2) / 2 + (c1 + c2), rel_tol=1e-9)
    assert v2 < v1  # the wide embedding (std 2) pays no hinge on most dimensions; the narrow one does


def test_nnclr_loss_by_hand_with_offset():
    """Eq. 2 of NNCLR written out: anchor NN(z_i), positive the other view's prediction p+_i,
    candidates every p+_k of the global batch; the two directions averaged."""
    torch.manual_seed(6)
    nn1, nn2 = torch.randn(3, 4).double(), torch.randn(3, 4).double()
    p1_all, p2_all = torch.randn(6, 4).double(), torch.randn(6, 4).double()
    t, offset = 0.1, 3

    def direction(nn, p_all):
        total = 0.0
        for i in range(3):
            logits = [cos(nn[i], p) / t for p in p_all]
            total += -math.log(math.exp(logits[offset + i]) / sum(math.exp(x) for x in logits))
        return total / 3

    expected = (direction(nn1, p2_all) + direction(nn2, p1_all)) / 2
    assert math.isclose(nnclr_loss(nn1, nn2, p1_all, p2_all, t, offset).item(), expected, rel_tol=1e-9)


def test_swav_loss_by_hand():
    """Eq. 3 of SwAV with multi-crop: each assignment crop's codes predicted from every other crop,
    averaged over the V - 1 partners, then over the assignment crops."""
    from sslrun.losses import swav_loss

    torch.manual_seed(7)
    scores = [torch.randn(3, 5).double() for _ in range(4)]
    codes = [torch.softmax(torch.randn(3, 5).double(), dim=1) for _ in range(2)]
    t = 0.1
    expected = 0.0
    for a, q in enumerate(codes):
        partners = [v for v in range(4) if v != a]
        for v in partners:
            log_p = torch.log_softmax(scores[v] / t, dim=1)
            expected += float(-(q * log_p).sum(dim=1).mean()) / len(partners)
    expected /= len(codes)
    assert math.isclose(swav_loss(scores, codes, t).item(), expected, rel_tol=1e-6)  # (float32 inside)


def test_mae_loss_by_hand():
    """MAE's loss written out: each masked patch's pixels standardised by their own mean and
    (unbiased) variance + 1e-6, the squared error averaged over pixels, then over patches."""
    from sslrun.losses import mae_loss

    torch.manual_seed(8)
    predictions, pixels = torch.randn(2, 3, 4).double(), torch.rand(2, 3, 4).double() * 5
    expected, raw = 0.0, 0.0
    for b in range(2):
        for i in range(3):
            x = pixels[b, i].tolist()
            mean = sum(x) / 4
            var = sum((v - mean) ** 2 for v in x) / 3
            target = [(v - mean) / math.sqrt(var + 1e-6) for v in x]
            expected += sum((p - t) ** 2 for p, t in zip(predictions[b, i].tolist(), target)) / 4 / 6
            raw += sum((p - v) ** 2 for p, v in zip(predictions[b, i].tolist(), x)) / 4 / 6
    assert math.isclose(mae_loss(predictions, pixels).item(), expected, rel_tol=1e-6)
    assert math.isclose(mae_loss(predictions, pixels, normalize_targets=False).item(), raw, rel_tol=1e-6)


def test_sigreg_by_hand_and_as_a_gaussianity_test():
    """SIGReg written out with complex exponentials: per direction the empirical characteristic
    function against exp(-t^2/2), weighted by it, integrated by the trapezoid rule over a grid
    symmetric about 0 (what the half-grid doubling must equal), times N, averaged. As a test it
    is near 0 for N(0, I) samples and large for a scaled or collapsed embedding."""
    import cmath

    from sslrun.losses import random_directions, sigreg_loss

    torch.manual_seed(10)
    z = torch.randn(12, 3).double() * 0.7 + 0.4
    directions = random_directions(3, 4, seed=1, device="cpu").double()
    t_max, knots = 3.0, 9
    grid = [t_max * (k - (knots - 1)) / (knots - 1) for k in range(2 * knots - 1)]  # -3 .. 3, step 0.375
    step = grid[1] - grid[0]
    total = 0.0
    for m in range(4):
        projections = [float(z[n] @ directions[:, m]) for n in range(12)]
        values = []
        for t in grid:
            phi = sum(cmath.exp(1j * t * x) for x in projections) / 12
            values.append(abs(phi - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2))
        integral = step * (sum(values) - (values[0] + values[-1]) / 2)
        total += 12 * integral / 4
    assert math.isclose(sigreg_loss(z, directions, t_max, knots).item(), total, rel_tol=1e-5)

    # Under the null (i.i.d. N(0, 1) projections) E N |phi_N(t) - phi(t)|^2 = 1 - phi(t)^2, so the
    # statistic's expectation is the quadrature of (1 - exp(-t^2)) exp(-t^2 / 2): about 0.91.
    knots_17 = [3.0 * k / 16 for k in range(17)]
    weights = [(3.0 / 16) * (1 if k in (0, 16) else 2) for k in range(17)]
    expected = sum(w * (1 - math.exp(-t * t)) * math.exp(-t * t / 2) for w, t in zip(weights, knots_17))
    many = random_directions(64, 128, seed=2, device="cpu")
    gaussian = sigreg_loss(torch.randn(32, 512, 64), many).item()  # the mean over 32 batches
    assert abs(gaussian - expected) < 0.05 * expected, (gaussian, expected)
    assert sigreg_loss(torch.randn(512, 64) * 3, many) > 50 * expected
    assert sigreg_loss(torch.randn(512, 1).expand(-1, 64), many) > 50 * expected  # collapsed to one dimension

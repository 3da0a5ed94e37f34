"""Self-distillation losses: DINO (Caron et al. 2021), iBOT (Zhou et al. 2022), DINOv2 (Oquab et
al. 2023) with Sinkhorn-Knopp centering and the KoLeo regulariser."""

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def centered_teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """DINO's centering and sharpening: P_t = softmax((g_t(x) - c) / tau_t)."""
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean_i g_t(x_i), the mean over the global batch (the caller reduces)."""
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3,
                   all_reduce_sum: Reduce = _identity) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's default centering).

    Q = exp(logits / tau)^T [K, B] is scaled alternately so that every prototype (row) holds mass
    1/K and every sample (column) mass 1/B, over the global batch of B samples (sums over rows are
    all-reduced across processes); after `iterations` rounds the columns are rescaled to sum to 1.
    Returns [B_local, K] targets."""
    q = torch.exp(teacher_logits.float() / temperature).t()  # no max shift: it must be global to be exact
    prototypes = q.shape[0]
    samples = all_reduce_sum(torch.tensor(q.shape[1], device=q.device, dtype=q.dtype))
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / samples
    return (q * samples).t()


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """L = 1/|pairs| sum_{t, s != t} mean_b H(P_t, P_s), H(p, q) = -sum_k p_k log q_k.

    `student_logits` are the student's outputs divided by its temperature, one [B, K] per crop,
    global crops first; `teacher_probs` the teacher targets of the global crops. A student crop is
    never compared with the teacher's view of the same crop."""
    total, pairs = 0.0, 0
    log_probs = [F.log_softmax(s.float(), dim=-1) for s in student_logits]
    for t, target in enumerate(teacher_probs):
        for s, log_q in enumerate(log_probs):
            if s == t:
                continue
            total = total + torch.sum(-target * log_q, dim=-1).mean()
            pairs += 1
    return total / pairs


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean h(p) = -sum_k p_k log p_k over rows; log K for uniform rows, 0 for one-hot ones."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """iBOT's masked-image loss: cross-entropy between teacher and student patch distributions at
    the masked positions only, averaged per image over its masked patches, then over all images:

        L = 1/B sum_b 1/|M_b| sum_{i in M_b} H(P_t(b, i), P_s(b, i))

    `student_logits` (already divided by the student temperature) and `teacher_probs` are [M, K]
    for the M masked patches in the order of `masks.nonzero()`; `masks` [B, N] bool. Images
    without masked patches count in B and contribute 0."""
    per_patch = torch.sum(-teacher_probs * F.log_softmax(student_logits.float(), dim=-1), dim=-1)
    image = masks.nonzero()[:, 0]
    weights = 1.0 / masks.sum(dim=1).clamp_min(1)[image]
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019): L = -1/n sum_i log(min_{j != i} ||x_i - x_j||) on
    l2-normalised x; it spreads features uniformly over the batch (computed per process)."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # on the unit sphere the nearest neighbour has the largest dot product
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()


def mean_over_batch(x: torch.Tensor, all_reduce_sum: Reduce = _identity) -> torch.Tensor:
    """Mean of x [B, K] over rows of the global batch: all-reduced sum / all-reduced count."""
    local = torch.tensor(float(x.shape[0]), device=x.device)
    return all_reduce_sum(x.sum(dim=0, keepdim=True)) / all_reduce_sum(local)

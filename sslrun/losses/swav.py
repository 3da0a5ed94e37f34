from typing import Sequence

import torch

from sslrun.losses.dino import dino_loss


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's swapped prediction over multi-crop (Caron et al. 2020, eq. 1-3 and sec. 3.2).

    With z_v the normalised projection of crop v, C the normalised prototypes, q_t the codes of
    assignment crop t (Sinkhorn-Knopp over the global batch) and p_v = softmax(z_v C^T / tau):

        L = 1/T sum_t 1/(V - 1) sum_{v != t} mean_b [ -sum_k q_t,k log p_v,k ]

    `scores`: z_v C^T per crop [B, K], the T assignment crops first; `codes`: q_t [B, K] per
    assignment crop. Every t has the same V - 1 partners, so this is the mean over (t, v != t)
    pairs of the cross-entropy, which is DINO's loss with the codes as targets.
    """
    return dino_loss([s / temperature for s in scores], codes)

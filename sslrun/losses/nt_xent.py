from typing import Optional

import torch
import torch.nn.functional as F


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    z1_all: Optional[torch.Tensor] = None,
    z2_all: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

    With s(u, v) = u.v / (|u| |v|) over the 2N embeddings of a batch of N image pairs, the loss of
    anchor i whose positive (the other view of the same image) is p(i) is

        l(i) = -log[ exp(s(z_i, z_p(i)) / T) / sum_{k != i} exp(s(z_i, z_k) / T) ]

    and the loss is the mean of l over all 2N anchors (both views of every image).

    z1, z2: this process's two views [B, D]. z1_all, z2_all: the same views gathered over all
    processes [N, D] (defaults: z1, z2), in which this process's rows start at `offset`. Anchors
    are the local rows, candidates all gathered rows, so averaging the per-process losses gives
    the loss of the global batch.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    batch, total = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = F.normalize(torch.cat([z1_all, z2_all]), dim=1)
    logits = anchors @ candidates.T / temperature

    rows = torch.arange(batch, device=z1.device) + offset
    self_index = torch.cat([rows, rows + total])
    positive_index = torch.cat([rows + total, rows])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * batch, device=z1.device), self_index] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, positive_index)

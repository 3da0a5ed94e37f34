import torch
import torch.nn.functional as F


def infonce_queue_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE against a queue of negatives, MoCo v2's loss (He et al. 2020, eq. 1; Chen et al. 2020c).

    With q, k and the K queued keys n_j l2-normalised:

        l = -log[ exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.n_j / T)) ]

    averaged over the batch. q [B, D] queries (with gradient), k [B, D] positive keys (from the
    momentum encoder, detached by the caller), queue [K, D] negatives.
    """
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def infonce_batch_loss(q: torch.Tensor, k_all: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """InfoNCE with the other keys of the (global) batch as negatives, scaled by 2T: MoCo v3's
    `ctr` (Chen, Xie & He 2021, algorithm 1):

        l(i) = -2T log[ exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T) ]

    averaged over the local queries. q [B, D] this process's queries, k_all [N, D] the keys of the
    whole batch gathered over processes, in which this process's rows start at `offset`. The 2T
    factor makes the gradient's scale independent of T, as in the reference code.
    """
    return 2 * temperature * in_batch_cross_entropy(q, k_all, temperature, offset)


def in_batch_cross_entropy(q: torch.Tensor, k_all: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """-log[ exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T) ] averaged over the local rows i, with q and
    k l2-normalised; q_i's positive is row offset + i of the gathered k_all."""
    q, k_all = F.normalize(q, dim=1), F.normalize(k_all, dim=1)
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)

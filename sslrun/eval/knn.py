from typing import Dict, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote on cosine similarity (Wu et al. 2018; DINO's protocol).

    Each query takes its k most similar bank features (cosine similarity s_j) and predicts

        argmax_c  sum_{j in top-k} exp(s_j / T) * [label_j == c]

    queries [Q, D], bank [N, D] (any scale: both are l2-normalised here), bank_labels [N].
    Returns the predicted labels [Q].
    """
    return knn_classify_many(queries, bank, bank_labels, num_classes, [k], temperature, chunk_size)[k]


@torch.no_grad()
def knn_classify_many(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                      ks: Sequence[int], temperature: float = 0.07, chunk_size: int = 1024) -> Dict[int, torch.Tensor]:
    """`knn_classify` for several k at once, {k: predicted labels [Q]}: one similarity search for
    the largest k, whose sorted neighbours contain every smaller k's."""
    bank = F.normalize(bank.float(), dim=1)
    largest = min(max(ks), bank.shape[0])
    predictions = {k: [] for k in ks}
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(largest, dim=1)
        weights, labels = (similarity / temperature).exp(), bank_labels[neighbours]
        for k in ks:
            votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}

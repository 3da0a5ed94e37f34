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
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)

import torch

from sslrun.eval import knn_classify


def test_knn_on_separated_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    bank_labels = torch.arange(3).repeat_interleave(20)
    bank = centres[bank_labels] + torch.randn(60, 3, generator=g)
    query_labels = torch.arange(3).repeat(5)
    queries = centres[query_labels] + torch.randn(15, 3, generator=g)
    assert torch.equal(knn_classify(queries, bank, bank_labels, 3, k=5), query_labels)


def test_weighted_vote_by_hand():
    # Query along x. Neighbours: one class-0 item at cosine 1.0, two class-1 items at cosine 0.8.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    # T = 0.07: exp(1/0.07) = 1.6e6 > 2 exp(0.8/0.07) = 1.8e5 -> class 0
    assert knn_classify(query, bank, labels, 3, k=3, temperature=0.07).item() == 0
    # T = 1: exp(1) = 2.72 < 2 exp(0.8) = 4.45 -> class 1
    assert knn_classify(query, bank, labels, 3, k=3, temperature=1.0).item() == 1
    # k = 1: nearest only
    assert knn_classify(query, bank, labels, 3, k=1, temperature=1.0).item() == 0


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(1)
    bank, labels, queries = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g), torch.randn(23, 8, generator=g)
    assert torch.equal(knn_classify(queries, bank, labels, 4, chunk_size=5), knn_classify(queries, bank, labels, 4))

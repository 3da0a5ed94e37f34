"""Evaluation protocols and signals on frozen features or embeddings."""

from sslrun.eval.collapse import effective_rank, normalized_std
from sslrun.eval.knn import knn_classify

__all__ = ["effective_rank", "knn_classify", "normalized_std"]

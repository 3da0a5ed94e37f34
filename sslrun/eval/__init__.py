"""Evaluation protocols and signals on frozen features or embeddings."""

from sslrun.eval.collapse import effective_rank, normalized_std
from sslrun.eval.knn import knn_classify
from sslrun.eval.zero_shot import class_embeddings, retrieval_recall, top_k_accuracy

__all__ = ["class_embeddings", "effective_rank", "knn_classify", "normalized_std", "retrieval_recall", "top_k_accuracy"]

"""Evaluation protocols and signals on frozen features or embeddings."""

from sslrun.eval.alignment import alignment, uniformity
from sslrun.eval.collapse import effective_rank, normalized_std
from sslrun.eval.knn import knn_classify, knn_classify_many
from sslrun.eval.zero_shot import class_embeddings, retrieval_recall, top_k_accuracy

__all__ = ["alignment", "class_embeddings", "effective_rank", "knn_classify", "knn_classify_many", "normalized_std",
           "retrieval_recall", "top_k_accuracy", "uniformity"]

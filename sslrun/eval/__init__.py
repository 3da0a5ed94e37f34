"""Evaluation protocols on frozen features."""

from sslrun.eval.knn import knn_classify

__all__ = ["knn_classify"]

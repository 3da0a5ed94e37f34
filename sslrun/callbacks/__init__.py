"""Callbacks: online evaluation (kNN / probe, image-text), pictures, collapse monitor, non-finite guard,
step checkpoints, throughput."""

from sslrun.callbacks.checkpoints import StepCheckpoints
from sslrun.callbacks.collapse import CollapseMonitor
from sslrun.callbacks.image_text_eval import ImageTextEvaluation
from sslrun.callbacks.nonfinite import NonFiniteGuard
from sslrun.callbacks.online_eval import OnlineEvaluation
from sslrun.callbacks.pictures import Pictures
from sslrun.callbacks.throughput import Throughput

__all__ = ["CollapseMonitor", "ImageTextEvaluation", "NonFiniteGuard", "OnlineEvaluation", "Pictures", "StepCheckpoints",
           "Throughput"]

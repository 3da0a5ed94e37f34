"""Callbacks: online evaluation, pictures, collapse monitor, throughput, atomic checkpoint files, requeue."""

from sslrun.callbacks.checkpoint_io import AtomicCheckpointIO
from sslrun.callbacks.collapse import CollapseMonitor
from sslrun.callbacks.online_eval import OnlineEvaluation
from sslrun.callbacks.pictures import Pictures
from sslrun.callbacks.requeue import Requeue
from sslrun.callbacks.throughput import Throughput
from sslrun.callbacks.zero_shot import ImageTextEvaluation

__all__ = ["AtomicCheckpointIO", "CollapseMonitor", "ImageTextEvaluation", "OnlineEvaluation", "Pictures", "Requeue",
           "Throughput"]

"""The collapse monitor: every method's training step returns the embedding its loss acts on."""

import math

import lightning as L
import torch

from sslrun.eval import effective_rank, normalized_std


class CollapseMonitor(L.Callback):
    """Logs the std of l2-normalised embeddings (healthy: about 1/sqrt(d); collapsed: 0), the same
    times sqrt(d) (healthy: about 1) and the effective rank, per step; keeps the last epoch's means
    for the summary. Steps with non-finite embeddings are left out."""

    def __init__(self):
        self.dim = None
        self._sums = {"embedding_std": 0.0, "effective_rank": 0.0}
        self._count = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        embedding = outputs["embedding"]
        if not torch.isfinite(embedding).all():
            return  # a step the non-finite guard skipped: nothing to measure
        self.dim = embedding.shape[1]
        std, rank = normalized_std(embedding).item(), effective_rank(embedding).item()
        self._sums["embedding_std"] += std
        self._sums["effective_rank"] += rank
        self._count += 1
        pl_module.log_dict({"collapse/std": std, "collapse/std_sqrt_d": std * math.sqrt(self.dim),
                            "collapse/effective_rank": rank})

    def summary(self) -> dict:
        if not self._count:
            return {}
        means = {k: v / self._count for k, v in self._sums.items()}
        return {**means, "embedding_std_healthy": 1 / math.sqrt(self.dim), "embedding_dim": self.dim,
                "collapse_protocol": "last epoch's mean over steps, process 0's batch, first view"}

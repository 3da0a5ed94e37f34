"""Online evaluation on frozen features: kNN and the linear probe, on the held-out split.

Runs before training (random-init baseline, plus raw pixels), every `every_n_epochs` epochs and
once at the end of training; the summary reports the final numbers, never the best ones, and
`knn_history`, every evaluation's kNN with its step and the training's wall time so far (kNN
against wall time: where a run crosses raw pixels). Every
process embeds its shard of the bank and queries, the features are gathered, and each process
scores the same gathered set (so FSDP-sharded models work too).
"""

import logging
import time

import torch

from sslrun.callbacks.periodic import PeriodicEvaluation
from sslrun.distributed import gather_rows
from sslrun.eval import knn_classify

log = logging.getLogger(__name__)


class OnlineEvaluation(PeriodicEvaluation):
    def __init__(self, datamodule, knn_cfg, every_n_epochs: int, num_classes: int):
        super().__init__(every_n_epochs)
        self.datamodule, self.knn_cfg, self.num_classes = datamodule, knn_cfg, num_classes
        self.history = []  # {"step", "wall_time_sec", "knn_top1"} per evaluation, random init first
        self._clock = time.perf_counter()

    def protocol(self) -> dict:
        bank, queries = self.knn_cfg.bank_size, self.knn_cfg.query_size
        return {
            "knn": f"cosine, weighted vote exp(s/T), k={self.knn_cfg.k}, T={self.knn_cfg.temperature}",
            "bank": "training split" + (f", fixed random {bank} images" if bank else ""),
            "queries": "held-out split" + (f", fixed random {queries} images" if queries else ""),
            "feature": "method.embed (backbone pooled features), eval view, model in eval mode",
            "linear_probe": "online linear classifier on detached features of the first training view",
            "reported": "final evaluation at the end of training (not the best epoch)",
        }

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        # a resumed run's clock goes on from its last evaluation (the time lost since is not counted)
        self._clock = time.perf_counter() - (self.history[-1]["wall_time_sec"] if self.history else 0.0)
        if "knn_top1_random_init" in self.results:  # resumed: the baseline was taken before
            return
        loaders = self._loaders(trainer)
        if loaders is None:
            return
        pixels = self._features(loaders, trainer, pl_module, embed=lambda x: x.flatten(1))
        self.results["knn_top1_pixels"] = self._knn(*pixels)
        features = self._features(loaders, trainer, pl_module, embed=pl_module.embed)
        self.results["knn_top1_random_init"] = self._knn(*features)
        self._record(0, self.results["knn_top1_random_init"])
        if trainer.is_global_zero:
            log.info("kNN top-1 before training: %.4f (raw pixels: %.4f)",
                     self.results["knn_top1_random_init"], self.results["knn_top1_pixels"])

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer, pl_module) -> None:
        loaders = self._loaders(trainer)
        if loaders is None:
            return
        (bank, bank_labels), (queries, query_labels) = self._features(loaders, trainer, pl_module, pl_module.embed)
        self.results["knn_top1"] = self._knn((bank, bank_labels), (queries, query_labels))
        metrics = {"eval/knn_top1": self.results["knn_top1"]}
        if pl_module.probe is not None:
            with torch.no_grad():
                predicted = pl_module.probe(queries.float()).argmax(1)
            self.results["linear_probe_top1"] = (predicted == query_labels).float().mean().item()
            metrics["eval/linear_probe_top1"] = self.results["linear_probe_top1"]
        self.evaluated_at_step = trainer.global_step
        self._record(trainer.global_step, self.results["knn_top1"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info("step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def _record(self, step: int, knn_top1: float) -> None:
        """One point of knn_history (an evaluation repeated at a step after a resume replaces it)."""
        entry = {"step": step, "wall_time_sec": round(time.perf_counter() - self._clock, 3), "knn_top1": knn_top1}
        self.history = [h for h in self.history if h["step"] != step] + [entry]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.history = [dict(h) for h in state_dict.get("history", [])]  # checkpoints from before it: none

    def _loaders(self, trainer):
        return self.datamodule.eval_loaders(trainer.global_rank, trainer.world_size)

    def _knn(self, bank_set, query_set) -> float:
        (bank, bank_labels), (queries, query_labels) = bank_set, query_set
        predicted = knn_classify(queries, bank, bank_labels, self.num_classes,
                                 self.knn_cfg.k, self.knn_cfg.temperature)
        return (predicted == query_labels).float().mean().item()

    @torch.no_grad()
    def _features(self, loaders, trainer, pl_module, embed):
        was_training = pl_module.training
        pl_module.eval()
        results = []
        try:
            for loader in loaders:
                features, labels = [], []
                for images, batch_labels in loader:
                    images = self.datamodule.augment.normalize(images.to(pl_module.device, non_blocking=True))
                    with trainer.precision_plugin.forward_context():
                        features.append(embed(images).float())
                    labels.append(batch_labels.to(pl_module.device))
                results.append((gather_rows(torch.cat(features)), gather_rows(torch.cat(labels))))
        finally:
            pl_module.train(was_training)
        return results

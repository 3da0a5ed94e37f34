"""Online image-text evaluation on the held-out pairs: zero-shot classification and retrieval.

Runs when the kNN evaluation does: before training (random init), every `every_n_epochs` epochs
and at the end. Zero-shot (Radford et al. 2021, sec. 3.1): each class's prompts go through the text
tower, their mean embedding is the class's weight, and a held-out image takes the class of highest
cosine similarity; top-1 and top-5. Retrieval: recall@1/5/10 image -> text and text -> image over
the held-out images and their captions (class-labelled data: one prompt per image, the same every
time). Every process embeds its share of the pairs; the embeddings are gathered and scored alike.
"""

import logging
from typing import Dict, List, Optional

import torch

from sslrun.callbacks.periodic import PeriodicEvaluation
from sslrun.distributed import gather_rows
from sslrun.eval import class_embeddings, retrieval_recall, top_k_accuracy

log = logging.getLogger(__name__)


class ImageTextEvaluation(PeriodicEvaluation):
    def __init__(self, datamodule, class_names: Optional[List[str]], every_n_epochs: int):
        super().__init__(every_n_epochs)
        self.datamodule, self.class_names = datamodule, class_names

    def protocol(self) -> dict:
        return {
            "zero_shot": "held-out images, classifier = mean normalised text embedding of method.prompts per "
                         "class name, cosine similarity, top-1 / top-5",
            "retrieval": "held-out images and their captions (class data: one prompt per image), recall@1/5/10 "
                         "image->text and text->image over the distinct captions",
        }

    def on_fit_start(self, trainer, pl_module) -> None:
        if "zero_shot_top1_random_init" not in self.results and "image_to_text_R@1_random_init" not in self.results:
            metrics = self._measure(trainer, pl_module)
            self.results.update({f"{name}_random_init": value for name, value in metrics.items()})

    def evaluate(self, trainer, pl_module) -> None:
        metrics = self._measure(trainer, pl_module)
        self.results.update(metrics)
        self.evaluated_at_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{name}": value for name, value in metrics.items()}, step=trainer.global_step)
        if trainer.is_global_zero and metrics:
            log.info("step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    @torch.no_grad()
    def _measure(self, trainer, pl_module) -> Dict[str, float]:
        loader = self.datamodule.heldout_pairs_loader(trainer.global_rank, trainer.world_size)
        if loader is None:
            return {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                images, texts, labels, tokens = self._embed_pairs(loader, pl_module)
                metrics = self._retrieval(images, texts, tokens)
                if self.class_names and bool((labels >= 0).all()):
                    classifier = self._classifier(pl_module)
                    accuracy = top_k_accuracy(images.float() @ classifier.T, labels, ks=(1, 5))
                    metrics = {"zero_shot_top1": accuracy[1], "zero_shot_top5": accuracy[5], **metrics}
        finally:
            pl_module.train(was_training)
        return metrics

    def _embed_pairs(self, loader, pl_module):
        parts = {"images": [], "texts": [], "labels": [], "tokens": []}
        for images, labels, tokens in loader:
            images = self.datamodule.augment.normalize(images.to(pl_module.device, non_blocking=True))
            tokens = tokens.to(pl_module.device)
            parts["images"].append(torch.nn.functional.normalize(pl_module.encode_image(images).float(), dim=-1))
            parts["texts"].append(torch.nn.functional.normalize(pl_module.encode_text(tokens).float(), dim=-1))
            parts["labels"].append(labels.to(pl_module.device))
            parts["tokens"].append(tokens)
        return [gather_rows(torch.cat(parts[name])) for name in ("images", "texts", "labels", "tokens")]

    @staticmethod
    def _retrieval(images: torch.Tensor, texts: torch.Tensor, tokens: torch.Tensor) -> Dict[str, float]:
        distinct, caption_of_image = torch.unique(tokens, dim=0, return_inverse=True)
        caption_texts = torch.zeros(len(distinct), texts.shape[1], device=texts.device)
        caption_texts.index_copy_(0, caption_of_image, texts)  # equal captions have equal embeddings
        return retrieval_recall(images, caption_texts, caption_of_image)

    def _classifier(self, pl_module) -> torch.Tensor:
        captions = self.datamodule.captions
        prompts = [prompt.format(name) for name in self.class_names for prompt in captions.prompts]
        tokens = captions.tokenizer(prompts).to(pl_module.device)
        embeddings = torch.cat([pl_module.encode_text(chunk).float() for chunk in tokens.split(1024)])
        return class_embeddings(embeddings.view(len(self.class_names), len(captions.prompts), -1))

"""Image-text evaluation: zero-shot classification and retrieval recall, on embeddings."""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot classifier (Radford et al. 2021, sec. 3.1.4, prompt ensembling): the text
    embeddings of every prompt of a class [C, P, D], l2-normalised, averaged over the prompts and
    normalised again -> [C, D]."""
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of rows whose label is among the k highest logits, for each k (k capped at the
    number of classes)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def retrieval_recall(images: torch.Tensor, texts: torch.Tensor, caption_of_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@k both ways over N images and T distinct captions, on cosine similarity.

    caption_of_image [N]: the index in `texts` [T, D] of each image's caption (several images may
    share one: captions made from class names). Image -> text: an image scores at k if its caption
    is among the k most similar texts. Text -> image: a caption scores at k if any of its images is
    among the k most similar images (COCO's protocol, where each image has several captions, the
    other way round).
    """
    similarity = F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T  # [N, T]
    results = {}
    top_texts = similarity.topk(min(max(ks), texts.shape[0]), dim=1).indices
    text_hits = top_texts == caption_of_image[:, None]
    top_images = similarity.T.topk(min(max(ks), images.shape[0]), dim=1).indices  # [T, k]
    image_hits = caption_of_image[top_images] == torch.arange(texts.shape[0], device=texts.device)[:, None]
    for k in ks:
        results[f"image_to_text_R@{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
        results[f"text_to_image_R@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
    return results

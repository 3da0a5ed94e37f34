"""Image-text contrastive losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              image_all: Optional[torch.Tensor] = None, text_all: Optional[torch.Tensor] = None,
              offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, fig. 3).

    With l2-normalised image and text embeddings x_i, y_j of N pairs and s_ij = e^t x_i . y_j
    (t = `logit_scale`, the learned log inverse temperature),

        L = 1/2 [ -1/N sum_i log softmax_j(s_i.)_i  -  1/N sum_j log softmax_i(s_.j)_j ]

    (image -> text and text -> image cross-entropy, the matching pair as the label).

    image, text: this process's rows [B, D]. image_all, text_all: the same gathered over all
    processes [N, D] (defaults: image, text), this process's rows starting at `offset`. The loss
    is over this process's rows against all gathered columns ("local loss", B x N logits); the mean
    of the per-process losses is L. To compute the whole N x N loss on every process instead, pass
    the gathered tensors as `image` and `text` (and offset 0).
    """
    image_all = image if image_all is None else image_all
    text_all = text if text_all is None else text_all
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_all, text_all = F.normalize(image_all, dim=-1), F.normalize(text_all, dim=-1)
    scale = logit_scale.exp()
    labels = torch.arange(image.shape[0], device=image.device) + offset
    image_to_text = F.cross_entropy(scale * image @ text_all.T, labels)
    text_to_image = F.cross_entropy(scale * text @ image_all.T, labels)
    return (image_to_text + text_to_image) / 2


def siglip_loss(image: torch.Tensor, texts: Sequence[torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 and algorithm 1).

    With l2-normalised x_i, y_j, t = `logit_scale` (log), b = `logit_bias`, and z_ij = 1 for a
    matching pair, -1 otherwise,

        L = -1/|B| sum_i sum_j log sigmoid( z_ij (e^t x_i . y_j + b) )

    over this process's |B| images and every text of the global batch. `texts` holds the text
    blocks this process sees: its own first (whose diagonal are the matching pairs), then the
    other processes' (all negatives), as passed round by `distributed.exchange_with_neighbours`.
    The mean of the per-process losses is the loss of the global batch.
    """
    image = F.normalize(image, dim=-1)
    scale = logit_scale.exp()
    total = image.new_zeros(())
    for k, text in enumerate(texts):
        logits = scale * image @ F.normalize(text, dim=-1).T + logit_bias
        signs = -torch.ones_like(logits)
        if k == 0:
            signs.diagonal().fill_(1.0)
        total = total - F.logsigmoid(signs * logits).sum()
    return total / image.shape[0]

from typing import Optional

import torch
import torch.nn.functional as F


def ijepa_loss(predictions: torch.Tensor, target_tokens: torch.Tensor, kind: str = "smooth_l1",
               patches: Optional[float] = None) -> torch.Tensor:
    """I-JEPA's regression (Assran et al. 2023, eq. 1):

        L = mean over predicted patches and channels of d(s_hat_y, LN(s_y))

    `predictions` [N, D]: the predictor's outputs at the target patches; `target_tokens` [N, D]:
    the target encoder's outputs there, layer-normalised here without affine parameters (the
    reference's `F.layer_norm(h, (D,))`) and not differentiated. d: `smooth_l1` (Huber with
    beta 1, what the reference code trains with) or `l2` (the squared distance the paper writes);
    the two agree, up to a factor 2, wherever a coordinate is off by less than 1.

    `patches`: what the mean divides by, N by default. Images draw blocks of different sizes, so
    processes hold different counts: given the global batch's count / processes, the processes'
    average (DDP's) is the mean over the global batch."""
    targets = F.layer_norm(target_tokens.detach().float(), target_tokens.shape[-1:])
    distance = F.mse_loss if kind == "l2" else F.smooth_l1_loss
    total = distance(predictions.float(), targets, reduction="sum")
    return total / ((len(predictions) if patches is None else patches) * predictions.shape[-1])

"""The optimizer and schedule of end-to-end fine-tuning (MAE, He et al. 2022, appendix A.3; BEiT,
Bao et al. 2022): AdamW, linear warmup then cosine decay to 0 per step, no weight decay on biases
and norms, and for ViTs layer-wise lr decay: with L blocks, the patch embedding (layer 0), block
i = 1..L (layer i) and the head and final norm (layer L + 1) train at

    lr_layer = lr * layer_decay^(L + 1 - layer)

Both are timm's (`create_optimizer_v2(layer_decay=...)`, whose parameter groups carry the scale
as `lr_scale`, and `CosineLRScheduler`, which applies it).
"""

from typing import Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler


def finetune_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                       layer_decay: Optional[float]) -> torch.optim.Optimizer:
    """AdamW over `model` (a timm model with its classifier), layer_decay None: one lr for all."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def finetune_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Per step (`schedule.step_update(step)`): 0 -> lr over warmup_steps, then cosine to 0."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=0.0, warmup_t=warmup_steps, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)

"""Parameter groups and the optimizer built from the optimizer config."""

from typing import Iterable, List, Tuple

import torch
import torch.nn as nn

from sslrun.optim.lars import LARS


def parameter_groups(
    named_parameters: Iterable[Tuple[str, nn.Parameter]],
    weight_decay: float,
    exclude_bias_and_norm: bool,
    bias_and_norm_lr_scale: float = 1.0,
) -> List[dict]:
    """Split parameters into decayed weights and (optionally) undecayed biases and norm params.

    Biases and normalisation parameters are the 0/1-dimensional tensors; excluding them from
    weight decay and from LARS adaptation follows SimCLR, BYOL and their reference code. Their
    group's learning rate is the scheduled one times `bias_and_norm_lr_scale` (Barlow Twins: 0.024).
    """
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True, "scheduled_weight_decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_adapt": False,
                       "lr_scale": bias_and_norm_lr_scale})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg, groups: List[dict], lr: float) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names. Groups may carry their own lr (e.g. the probe's); keys other
    optimizers do not know (lars_adapt) are kept in their groups and ignored."""
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"optimizer.name={cfg.name}: unknown optimizer")

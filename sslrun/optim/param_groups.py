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


def vit_layer(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay (BEiT, sec. 2.6): patch embedding and
    tokens 0, block i is i + 1, everything after the blocks (final norm, heads) num_blocks + 1."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(key in name for key in ("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
        return 0
    return num_blocks + 1


def layerwise_groups(named_parameters: Iterable[Tuple[str, nn.Parameter]], num_blocks: int, decay: float,
                     patch_embed_lr_mult: float, weight_decay: float, exclude_bias_and_norm: bool) -> List[dict]:
    """DINOv2's parameter groups: lr scaled by decay ** (num_blocks + 1 - layer) (layer-wise lr
    decay), times `patch_embed_lr_mult` for the patch embedding; no weight decay for biases, norm
    and layer-scale parameters (the <= 1-dimensional ones). Parameters with equal settings share a
    group."""
    groups = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr_scale = decay ** (num_blocks + 1 - vit_layer(name, num_blocks))
        if "patch_embed" in name:
            lr_scale *= patch_embed_lr_mult
        decayed = not (exclude_bias_and_norm and param.ndim <= 1)
        key = (lr_scale, decayed)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": lr_scale, "weight_decay": weight_decay if decayed else 0.0,
                           "lars_adapt": decayed, "scheduled_weight_decay": decayed}
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(cfg, groups: List[dict], lr: float) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names. Groups may carry their own lr (e.g. the probe's); keys other
    optimizers do not know (lars_adapt) are kept in their groups and ignored."""
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused)
    raise ValueError(f"optimizer.name={cfg.name}: unknown optimizer")

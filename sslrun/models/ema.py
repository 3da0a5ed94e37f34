"""Momentum (EMA) copies of modules: MoCo's key encoder, BYOL's target network."""

import copy
from typing import Sequence

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online, parameter by parameter.

    Buffers (BN running statistics) are not averaged: the target keeps its own, from its own
    forward passes, as in MoCo and BYOL. Each process updates the parameters it holds, so a
    sharded target is updated shard by shard with no communication."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} parameters, online {len(onlines)}")
    torch._foreach_lerp_(targets, onlines, 1.0 - momentum)


class MomentumEncoder(nn.Module):
    """A frozen copy of `online` modules, run as one module and moved towards them by ema_update.

    `online` is a sequence applied in order (e.g. [backbone, projector]); the copy never gets
    gradients, and its parameters are excluded from the optimizer."""

    def __init__(self, online: Sequence[nn.Module]):
        super().__init__()
        self.encoder = nn.Sequential(*(copy.deepcopy(m) for m in online)).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def update(self, online: Sequence[nn.Module], momentum: float) -> None:
        ema_update(self.encoder, nn.Sequential(*online), momentum)

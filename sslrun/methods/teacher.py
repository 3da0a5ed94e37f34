"""The momentum teacher, once for every method that has one (BYOL's target, MoCo's key encoder,
DINO's teacher, distillation's spare student EMA): an EMA copy of the student modules with its
momentum schedule and the metric it logs."""

from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath

from sslrun.models.ema import MomentumEncoder
from sslrun.optim import WarmupCosine


class MomentumTeacher(MomentumEncoder):
    """theta_t <- m theta_t + (1 - m) theta_s after every optimizer step, with m rising from
    `momentum` to `final_momentum` on a cosine over `total_steps` (BYOL's schedule for tau, also
    MoCo v3's and DINO's; final_momentum = momentum keeps it constant, as MoCo v2 does).

    The teacher never drops paths (DINO's reference code): stochastic depth regularises the student,
    the teacher gives targets. It is a frozen module: no gradients, not in the optimizer."""

    def __init__(self, students: Sequence[nn.Module], momentum: float, final_momentum: float, total_steps: int):
        super().__init__(students)
        self.schedule = WarmupCosine(peak=momentum, final=final_momentum, total_steps=total_steps)
        for module in self.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0

    def momentum(self, step: int) -> float:
        return self.schedule(step)

    def follow(self, students: Sequence[nn.Module], step: int) -> None:
        """The EMA step after optimizer step `step` (Lightning counts it once this returns)."""
        self.update(students, self.momentum(step))

    def metrics(self, step: int) -> Dict[str, torch.Tensor]:
        return {"momentum": torch.tensor(self.momentum(step))}

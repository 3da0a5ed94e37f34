"""Optimizers (SGD, AdamW, LARS), parameter groups and schedules (plain objects)."""

from sslrun.optim.lars import LARS
from sslrun.optim.param_groups import build_optimizer, parameter_groups
from sslrun.optim.schedules import WarmupCosine

__all__ = ["LARS", "build_optimizer", "parameter_groups", "WarmupCosine"]

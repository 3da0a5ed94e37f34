"""Optimizers (SGD, AdamW, LARS), parameter groups and schedules (plain objects)."""

from sslrun.optim.lars import LARS
from sslrun.optim.param_groups import build_optimizer, layerwise_groups, parameter_groups, vit_layer
from sslrun.optim.schedules import WarmupCosine

__all__ = ["LARS", "build_optimizer", "layerwise_groups", "parameter_groups", "vit_layer", "WarmupCosine"]

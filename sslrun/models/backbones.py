"""Backbones come from timm; this module only adapts them (small-image stem) and names errors."""

import difflib

import timm
import torch.nn as nn

from sslrun.config import ConfigError
from sslrun.models.vit import enable_packing


class BackboneError(ConfigError):
    """The backbone config cannot be built; the message says how to fix it."""


def build_backbone(cfg, in_chans: int) -> nn.Module:
    """A timm model returning pooled features [B, num_features] (classifier removed)."""
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"backbone.name={cfg.name}: not a timm model{hint}")
    model = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=0,
        in_chans=in_chans,
        drop_path_rate=cfg.drop_path_rate,
        **dict(cfg.timm_kwargs),
    )
    if cfg.small_stem:
        use_small_stem(model, cfg.name)
    if cfg.attention is not None:
        enable_packing(model, cfg.attention)
    return model


def use_small_stem(model: nn.Module, name: str) -> None:
    """CIFAR-style stem (He et al. 2016, sec. 4.2; SimCLR appendix B.9): a 3x3 stride-1
    convolution and no max-pool, so 32x32 inputs keep their resolution into the first stage."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise BackboneError(
            f"backbone.small_stem=true: {name} has no single-conv ResNet stem to replace; "
            f"use a plain ResNet (resnet18, resnet50) or set backbone.small_stem=false"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()

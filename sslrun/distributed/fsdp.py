"""FSDP2 sharding plans (`torch.distributed.fsdp.fully_shard`), kept apart from the models.

A backbone is sharded unit by unit, then at its root: each transformer block of a ViT, each stage
of a ResNet, then what is left (embeddings, final norm). A ViT's packed multi-crop pass runs as
methods of the ViT and of its blocks (`models.vit.enable_packing`), not through `forward`, so
those methods are registered with FSDP to unshard and reshard around them as `forward` does.
A momentum teacher sharded by the same plan holds the same shards as its student on every rank,
so its EMA step (`models.ema.ema_update`) is local: no communication.
"""

from typing import List

import torch.nn as nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def shard_units(backbone: nn.Module) -> List[nn.Module]:
    """The modules sharded on their own before the backbone's root: ViT blocks or ResNet stages."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [getattr(backbone, name) for name in RESNET_STAGES if hasattr(backbone, name)]


def shard_backbone(backbone: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Shard `backbone` in place (its units, then its root); `fsdp_kwargs` go to every `fully_shard`
    (mesh, reshard_after_forward, mp_policy, offload_policy)."""
    for module in [*shard_units(backbone), backbone]:
        fully_shard(module, **fsdp_kwargs)
        if hasattr(module, "packed"):
            register_fsdp_forward_method(module, "packed")
    return backbone

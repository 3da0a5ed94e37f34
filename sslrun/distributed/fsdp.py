"""FSDP2 sharding plans (`torch.distributed.fsdp.fully_shard`), kept apart from the models.

A backbone is sharded unit by unit, then at its root: each transformer block of a ViT, each stage
of a ResNet, then what is left (embeddings, final norm). A ViT's packed multi-crop pass runs as
methods of the ViT and of its blocks (`models.vit.enable_packing`), not through `forward`, so
those methods are registered with FSDP to unshard and reshard around them as `forward` does.
A momentum teacher sharded by the same plan holds the same shards as its student on every rank,
so its EMA step (`models.ema.ema_update`) is local: no communication.

A whole method (`shard_method`) is sharded module by module: each backbone as above, each other
module with parameters (heads, predictors, the probe, DINOv2's mask token) as one unit, looking
inside containers (ModuleList, plain Sequential, a momentum encoder) for them. Each of these
(a backbone, a head) is its own FSDP root, gathered around its own forward (or registered
method), so the method's training code stays unchanged.
"""

import functools
from typing import List, Optional

import torch
import torch.nn as nn
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
# Methods of a ViT (besides forward) that run its weights: sslrun's packed pass, timm's features.
FORWARD_METHODS = ("packed", "forward_features")
PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_backbone(module: nn.Module) -> bool:
    return hasattr(module, "blocks") or hasattr(module, RESNET_STAGES[0])


def shard_units(backbone: nn.Module) -> List[nn.Module]:
    """The modules sharded on their own before the backbone's root: ViT blocks or ResNet stages."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [getattr(backbone, name) for name in RESNET_STAGES if hasattr(backbone, name)]


def _shard(module: nn.Module, **fsdp_kwargs) -> None:
    fully_shard(module, **fsdp_kwargs)
    for name in FORWARD_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)


def shard_backbone(backbone: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Shard `backbone` in place (its units, then its root); `fsdp_kwargs` go to every `fully_shard`
    (mesh, reshard_after_forward, mp_policy, offload_policy)."""
    for module in [*shard_units(backbone), backbone]:
        _shard(module, **fsdp_kwargs)
    return backbone


def checkpoint_activations(backbone: nn.Module) -> None:
    """Recompute each unit's activations in the backward pass instead of keeping them (memory
    for compute); applied before sharding, so FSDP gathers the weights around the recomputation."""
    for unit in shard_units(backbone):
        for name in ("forward", "packed"):
            if hasattr(unit, name):
                setattr(unit, name, functools.partial(checkpoint, getattr(unit, name), use_reentrant=False))


def is_container(module: nn.Module) -> bool:
    """Holds modules that are called one by one (or in order), not run as one unit."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module) is nn.Sequential:
        return True
    owns_parameters = any(True for _ in module.parameters(recurse=False))
    return not owns_parameters and any(is_backbone(m) for m in module.modules())


def fsdp_options(mesh, reshard_after_forward: bool = True, param_dtype: Optional[str] = None,
                 cpu_offload: bool = False) -> dict:
    """`fully_shard` keyword arguments from trainer.fsdp: bf16 parameters are gathered and
    computed in bf16 while gradients are reduced in fp32 (DINOv2's and torchtitan's choice)."""
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
    if cpu_offload:  # on a CPU-only run it changes nothing but still runs (tested there)
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return options


def shard_method(method: nn.Module, options: dict, activation_checkpointing: bool = False) -> None:
    """Shard every module of `method` that has parameters (see the module docstring). Frozen
    modules (teachers) always reshard after forward: they run no backward that would."""

    def visit(module: nn.Module) -> None:
        parameters = list(module.parameters())
        if not parameters:
            return
        frozen = not any(p.requires_grad for p in parameters)
        kwargs = {**options, "reshard_after_forward": True} if frozen else options
        if is_backbone(module):
            if activation_checkpointing and not frozen:
                checkpoint_activations(module)
            shard_backbone(module, **kwargs)
        elif is_container(module):
            for child in module.children():
                visit(child)
        else:
            _shard(module, **kwargs)

    for child in method.children():
        visit(child)
    loose = [name for name, p in method.named_parameters() if not isinstance(p, DTensor)]
    if loose:
        raise ValueError(f"trainer=fsdp: parameters {loose} belong to no module FSDP can shard; give each "
                         f"its own nn.Module whose forward uses it (as models.vit.MaskToken does)")

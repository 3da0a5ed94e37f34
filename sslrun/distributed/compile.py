"""How a method's modules run on the device, kept apart from the models as sharding is:
regional compilation (`trainer.compile`), channels-last CNNs and TF32 matmuls.

Regional compilation compiles each repeated unit on its own, as dinov3 and torchtitan do, rather
than the whole model: a transformer block or a ResNet stage compiles once and its identical
siblings reuse the graph (torch guards on a module's type and tensor shapes, not on which module
it is), so compile time does not grow with depth, and FSDP2's hooks, which run around each unit,
stay outside the graphs. What is compiled, per backbone (the trained ones, their EMA teachers,
predictors and text towers alike):

- each unit's `forward` (ViT and text-tower blocks, ResNet stages), the path of every plain
  forward (evaluation, CNN methods, CLIP's text tower);
- in a block's packed pass, its token-wise parts (`models.vit.PACKED_PARTS`: qkv, the attention
  output, the MLP). The block-diagonal attention between them stays outside: how it batches the
  segments depends on the packing, which changes with efficient stochastic depth at every call.
  The token-wise parts see only a token count, which torch marks dynamic after its second value,
  so varying lengths cost one more compilation, not one per length;

and every head (a module with sub-modules, outside the backbones) as one graph. Single layers
(the probe, a mask token) stay eager: there is nothing to fuse.
"""

import logging
from typing import Optional

import torch
import torch.nn as nn

from sslrun.config.errors import ConfigError
from sslrun.distributed.fsdp import is_backbone, is_container, shard_units
from sslrun.models.vit import PACKED_PARTS

log = logging.getLogger(__name__)


def compile_method(method: nn.Module, backend: str = "inductor", mode: str = "default") -> int:
    """Compile `method`'s units and heads in place (see the module docstring); returns how many
    functions were wrapped. Call it once the method is built (its teachers copied from their
    students), before it is sharded."""
    count = 0

    def wrap(owner: nn.Module, name: str) -> None:
        nonlocal count
        setattr(owner, name, torch.compile(getattr(owner, name), backend=backend, mode=mode))
        count += 1

    def visit(module: nn.Module) -> None:
        if not any(True for _ in module.parameters()):
            return
        if is_backbone(module):
            for unit in shard_units(module):
                wrap(unit, "forward")
                for part in PACKED_PARTS:
                    if hasattr(unit, part):
                        wrap(unit, part)
        elif is_container(module):
            for child in module.children():
                visit(child)
        elif any(True for _ in module.children()):
            wrap(module, "forward")

    for child in method.children():
        visit(child)
    log.info("trainer.compile: %d regions compiled (backend %s, mode %s)", count, backend, mode)
    return count


def use_channels_last(method: nn.Module) -> int:
    """CNN backbones (ResNets) in channels-last memory format, their inputs converted on the way
    in: what cuDNN's convolutions run fastest on with tensor cores. Returns how many backbones."""
    converted = 0
    for module in method.modules():
        if is_backbone(module) and not hasattr(module, "blocks"):
            module.to(memory_format=torch.channels_last)
            module.register_forward_pre_hook(_channels_last_input)
            converted += 1
    return converted


def _channels_last_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    images = args[0]
    if torch.is_tensor(images) and images.dim() == 4:
        return (images.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 accumulation),
    as DINOv2 and torchtitan train; no effect on CPU."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def on_cuda(accelerator: str) -> bool:
    return accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())


def require_visible_gpu(accelerator: str) -> None:
    """trainer.accelerator=gpu needs a CUDA device here: said in one line before anything is built."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu: no CUDA device is visible here; use "
                          "trainer.accelerator=cpu or auto")


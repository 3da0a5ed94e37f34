"""Multi-crop views through a backbone of any kind, one batch per crop size (the ViTs' packed
pass, one sequence for every size, is sslrun.models.vit.packed_forward)."""

from typing import List, Sequence

import torch
import torch.nn as nn


def same_size_runs(crops: Sequence[torch.Tensor]) -> List[tuple]:
    """(start, end) of each run of consecutive crops with one spatial size (multi-crop lists the
    global crops first, then the local ones)."""
    runs, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        runs.append((start, end))
        start = end
    return runs


def forward_by_resolution(backbone: nn.Module, crops: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Any backbone (a ResNet too) over multi-crop views: one forward per run of same-size crops,
    batched, as SwAV's and DINO's reference code run a ResNet; the output per crop, in order."""
    outputs = []
    for start, end in same_size_runs(crops):
        outputs.extend(backbone(torch.cat(crops[start:end])).chunk(end - start))
    return outputs


def crop_features(backbone: nn.Module, crops: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Pooled features [B, D] per crop from any backbone: a ViT set up for packing runs every crop
    in one packed sequence (its class tokens), any other backbone one batch per crop size."""
    if hasattr(backbone, "block_diagonal_attention"):
        from sslrun.models.vit import class_tokens, packed_forward

        return [class_tokens(tokens) for tokens in packed_forward(backbone, crops)]
    return forward_by_resolution(backbone, crops)

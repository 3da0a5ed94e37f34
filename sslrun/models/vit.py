"""Sequence-packed forward of a timm VisionTransformer over crops of several resolutions.

Each crop is patchified with its own interpolated position embedding (timm's
`dynamic_img_size`), the tokens of all crops of all images are concatenated into one sequence,
and the blocks run once with block-diagonal attention (`models.attention`) so a token sees only
its own crop. The outputs are split back per crop. The backbone stays a plain timm model: its
weights, `forward` and `forward_features` are untouched, only the way the blocks are called here
differs.

Stochastic depth is the efficient kind (DINOv2): each residual branch runs on a random subset of
the segments (whole crops) and its output is scaled by segments / kept, instead of running on all
of them and zeroing the dropped ones.
"""

import types
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from sslrun.config import ConfigError
from sslrun.models.attention import BlockDiagonalAttention, Packing, run_grouped
from sslrun.models.multicrop import same_size_runs


def is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("blocks", "patch_embed", "_pos_embed"))


def enable_packing(vit: nn.Module, attention: str) -> nn.Module:
    """Give a timm ViT the attention backend its packed forward uses (`backbone.attention`)."""
    if not is_vit(vit):
        raise ConfigError(f"backbone.attention={attention}: {type(vit).__name__} is not a timm VisionTransformer; "
                          f"set backbone.attention=null, or use a ViT backbone (vit_tiny, vit_small, vit_base, "
                          f"vit_large, vit_tiny_p4)")
    for block in vit.blocks:
        needed = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
        if not all(hasattr(block, n) for n in needed) or not hasattr(block.attn, "qkv"):
            raise ConfigError(f"backbone.name: {type(block).__name__} blocks cannot be packed; only timm's "
                              f"pre-norm ViT Block can")
    if not getattr(vit, "dynamic_img_size", False):
        raise ConfigError("backbone.timm_kwargs.dynamic_img_size: must be true so crops of every size get their "
                          "own interpolated position embedding")
    vit.block_diagonal_attention = BlockDiagonalAttention(attention)
    # The packed pass runs as methods of the ViT and of each block (not through `forward`), so a
    # sharded model can hook them as it hooks `forward`: see `sslrun.distributed.fsdp`.
    vit.packed = types.MethodType(_packed_pass, vit)
    pack_blocks(vit.blocks)
    return vit


def pack_blocks(blocks) -> None:
    """Give each timm Block the `packed(x, packing, attention)` method the packed passes call, and
    the token-wise parts it runs (`PACKED_PARTS`)."""
    for block in blocks:
        block.packed = types.MethodType(packed_block, block)
        for name, part in zip(PACKED_PARTS, (packed_qkv, packed_attention_output, packed_mlp)):
            setattr(block, name, types.MethodType(part, block))


def require_packing(model: nn.Module, method: str) -> None:
    if not hasattr(model, "block_diagonal_attention"):
        raise ConfigError(f"backbone: method={method} runs multi-crop ViTs; use a ViT backbone with "
                          f"backbone.attention set (backbone=vit_tiny_p4 for 28-32 px images, vit_small at 224 px)")


class MaskToken(nn.Module):
    """The learned embedding that stands in for masked patches (iBOT / DINOv2 masked image
    modelling). A module, not a bare parameter, so that a sharded model gathers it when used."""

    def __init__(self, width: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(width))

    def forward(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches [B, N, D], mask [B, N] (bool): the masked ones replaced by the token."""
        return torch.where(mask.unsqueeze(-1), self.token.to(patches.dtype), patches)


def crop_tokens(vit: nn.Module, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                mask_token: Optional[MaskToken] = None) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, prefix + patches, D], the input of the first block.

    `mask` [B, patches] (bool) replaces those patch embeddings by `mask_token` before the position
    embedding is added (iBOT / DINOv2 masked image modelling)."""
    x = vit.patch_embed(images)
    if mask is not None:
        x = mask_token(x.reshape(x.shape[0], -1, x.shape[-1]), mask).view_as(x)
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))


def _drop_rate(block: nn.Module) -> float:
    return float(getattr(block.drop_path1, "drop_prob", 0.0))


# A block's token-wise parts: each token on its own, so they are the same computation whatever the
# packing, and `distributed.compile` compiles them (the attention between them depends on it).
PACKED_PARTS = ("packed_qkv", "packed_attention_output", "packed_mlp")


def packed_qkv(block: nn.Module, x: torch.Tensor):
    """[1, tokens, D] -> (q, k, v) [1, heads, tokens, head dim] and the normed input (the gate's)."""
    attn, tokens = block.attn, x.shape[1]
    normed = block.norm1(x)
    qkv = attn.qkv(normed).reshape(1, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, normed


def packed_attention_output(block: nn.Module, normed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The attention branch after the attention itself: heads merged, gated, projected, scaled."""
    attn = block.attn
    out = out.transpose(1, 2).reshape(1, out.shape[2], -1)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(normed).sigmoid()
    return block.ls1(attn.proj_drop(attn.proj(attn.norm(out))))


def packed_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.ls2(block.mlp(block.norm2(x)))


def residual_on_subset(x: torch.Tensor, packing: Packing, branch, drop_rate: float) -> torch.Tensor:
    """x + branch(x) with whole segments dropped: the branch runs on the kept ones only."""
    segments = len(packing.lengths)
    kept = max(1, int(segments * (1.0 - drop_rate)))
    chosen = torch.randperm(segments)[:kept].sort().values
    index = packing.token_index(chosen).to(x.device, non_blocking=True)
    residual = branch(x[:, index], packing.subset(chosen))
    return x.index_add(1, index, residual.to(x.dtype), alpha=segments / kept)


def packed_block(block: nn.Module, x: torch.Tensor, packing: Packing,
                 attention: BlockDiagonalAttention) -> torch.Tensor:
    """timm's pre-norm Block on a packed [1, tokens, D] sequence."""
    def attention_branch(t, p):
        q, k, v, normed = block.packed_qkv(t)
        return block.packed_attention_output(normed, attention(q, k, v, p))

    def mlp_branch(t, p):
        return block.packed_mlp(t)

    rate = _drop_rate(block)
    for branch in (attention_branch, mlp_branch):
        if block.training and rate > 0:
            x = residual_on_subset(x, packing, branch, rate)
        else:
            x = x + branch(x, packing)
    return x


def blocks_packed(blocks, x: torch.Tensor, packing: Packing, attention: BlockDiagonalAttention) -> torch.Tensor:
    for block in blocks:
        x = block.packed(x, packing, attention)
    return x


# Patches kept per image: [B, K] indices, or B 1-D index tensors of any lengths.
Kept = Union[torch.Tensor, Sequence[torch.Tensor]]


def packed_forward(vit: nn.Module, crops: Sequence[torch.Tensor],
                   masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   mask_token: Optional[MaskToken] = None,
                   keep: Optional[Sequence[Optional[Kept]]] = None) -> List[torch.Tensor]:
    """Run `crops` (each [B, C, H, W], any mix of sizes) through `vit` as one packed sequence.

    Returns the final-norm tokens per crop, [B, prefix + patches, D] each, in input order. The
    attention backend is the one `enable_packing` gave the model.

    `keep[c]`, when given for crop c, drops the other patches after the position embedding (MAE's
    encoder, I-JEPA's context): per image the indices of the patches to keep, as a [B, K] tensor
    or a list of B 1-D tensors of any lengths. That crop's output is then flat, [sum over images
    of (prefix + kept), D]: image by image, its prefix tokens, then its kept patches in the order
    given. Segments of different lengths cost no padding: each is its own block of the attention."""
    return vit.packed(crops, masks, mask_token, keep)


def kept_rows(kept: Kept, tokens: int, prefix: int, device) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Rows of the flattened [B * tokens, D] crop that `kept` keeps, and each image's length."""
    if torch.is_tensor(kept) and kept.dim() == 2:
        batch, count = kept.shape
        rows = torch.cat([torch.arange(prefix, device=device).expand(batch, prefix), kept.to(device) + prefix], 1)
        rows = rows + torch.arange(batch, device=device)[:, None] * tokens
        return rows.flatten(), (prefix + count,) * batch
    counts = [len(k) for k in kept]
    starts = torch.arange(len(kept), device=device) * tokens
    patches = torch.cat(list(kept)).to(device) + prefix
    patches += starts.repeat_interleave(torch.tensor(counts, device=device), output_size=len(patches))
    firsts = (starts[:, None] + torch.arange(prefix, device=device)).unbind()  # each image's prefix rows
    rows = torch.cat([part for pair in zip(firsts, patches.split(counts)) for part in pair])  # one cat, not one each
    return rows, tuple(prefix + count for count in counts)


def _packed_pass(vit: nn.Module, crops, masks, mask_token, keep=None) -> List[torch.Tensor]:
    attention = vit.block_diagonal_attention
    masks = masks or [None] * len(crops)
    keep = keep or [None] * len(crops)
    flat, lengths = [], []
    for images, mask, kept in zip(crops, masks, keep):
        tokens = crop_tokens(vit, images, mask, mask_token)
        batch, count = tokens.shape[:2]
        if kept is None:
            flat.append(tokens.flatten(0, 1))
            lengths.append((count,) * batch)
        else:
            rows, kept_lengths = kept_rows(kept, count, vit.num_prefix_tokens, tokens.device)
            flat.append(tokens.flatten(0, 1)[rows])
            lengths.append(kept_lengths)
    packing = Packing(tuple(length for crop in lengths for length in crop))
    x = (flat[0] if len(flat) == 1 else torch.cat(flat)).unsqueeze(0)  # a cat of one is a copy
    x = vit.norm(run_grouped(x, packing, lambda t, p: blocks_packed(vit.blocks, t, p, attention))).squeeze(0)
    parts = x.split([sum(crop) for crop in lengths])
    return [part if kept is not None else part.view(len(crop), crop[0], -1)
            for part, crop, kept in zip(parts, lengths, keep)]


def grouped_forward(vit: nn.Module, crops: Sequence[torch.Tensor],
                    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    mask_token: Optional[MaskToken] = None) -> List[torch.Tensor]:
    """The unpacked way (DINO's reference code): one forward per run of same-size crops, batched.

    A run of equal-length segments is exactly a batch, so this is `packed_forward` per group.
    Masks, when given, are given for every crop of a group or for none."""
    masks = list(masks or [None] * len(crops))
    outputs = []
    for start, end in same_size_runs(crops):
        group_masks = masks[start:end]
        batch_mask = [torch.cat(group_masks)] if group_masks[0] is not None else None
        out = packed_forward(vit, [torch.cat(crops[start:end])], batch_mask, mask_token)[0]
        outputs.extend(out.chunk(end - start))
    return outputs



def class_tokens(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 0]


def patch_tokens(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, vit.num_prefix_tokens:]

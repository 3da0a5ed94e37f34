"""A narrow transformer that predicts the tokens at some grid positions from the tokens at others:
MAE's decoder (He et al. 2022, sec. 3) and I-JEPA's predictor (Assran et al. 2023, sec. 3).

Each input segment (an image, or an image and one of its target blocks) is its context tokens,
embedded to the predictor's width, followed by one learned mask token per query position, each
token plus the fixed 2-D sin-cos embedding of its grid position (prefix tokens, such as a class
token, get none). Segments of any lengths run as one packed sequence with block-diagonal
attention (`models.attention`), so no segment is padded or truncated; the outputs at the query
positions are projected to `out_dim` (pixels per patch for MAE, the encoder's width for I-JEPA).
"""

from typing import Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from sslrun.models.attention import BlockDiagonalAttention, Packing, run_grouped
from sslrun.models.vit import blocks_packed, pack_blocks

NO_POSITION = 0  # the position id of a prefix token; patch j of the grid has id j + 1


def sincos_positions(grid: Tuple[int, int], width: int) -> torch.Tensor:
    """[gh * gw, width], row-major over the grid: the first half of the channels encodes the column,
    the second the row, each as [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (width / 4)) (MAE's
    and I-JEPA's table, in that order)."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([one_axis(columns.flatten()), one_axis(rows.flatten())], dim=1).float()


def segment_layout(context_lengths: Sequence[int], query_lengths: Sequence[int], device):
    """Where the context and the query tokens of each segment sit in the packed sequence."""
    context = torch.tensor(context_lengths, device=device)
    queries = torch.tensor(query_lengths, device=device)
    starts = torch.cumsum(context + queries, 0) - context - queries

    def positions(lengths, offset):
        within = torch.arange(int(lengths.sum()), device=device)
        within -= torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        return torch.repeat_interleave(starts + offset, lengths) + within

    return positions(context, 0), positions(queries, context)


class TokenPredictor(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, heads: int, out_dim: int, grid: Tuple[int, int],
                 attention: BlockDiagonalAttention, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        table = torch.cat([torch.zeros(1, width), sincos_positions(grid, width)])
        self.register_buffer("position_table", table, persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                                    for _ in range(depth))
        pack_blocks(self.blocks)
        self.norm = _layer_norm(width)
        self.head = nn.Linear(width, out_dim)
        self.attention = attention
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_positions: torch.Tensor, context_lengths: Sequence[int],
                query_positions: torch.Tensor, query_lengths: Sequence[int]) -> torch.Tensor:
        """context [sum(context_lengths), in_dim], its position ids (NO_POSITION or patch + 1);
        query position ids [sum(query_lengths)]; segment s is context_lengths[s] context tokens
        then query_lengths[s] queries. Returns the predictions at the queries, [queries, out_dim]."""
        context_at, query_at = segment_layout(context_lengths, query_lengths, context.device)
        table = self.position_table
        embedded = self.embed(context)
        x = embedded.new_empty(len(context_at) + len(query_at), embedded.shape[1])
        x[context_at] = embedded + table[context_positions].to(x.dtype)
        x[query_at] = self.mask_token.to(x.dtype) + table[query_positions].to(x.dtype)
        packing = Packing(tuple(c + q for c, q in zip(context_lengths, query_lengths)))
        x = run_grouped(x.unsqueeze(0), packing, lambda t, p: blocks_packed(self.blocks, t, p, self.attention))
        return self.head(self.norm(x[0, query_at]))


def _layer_norm(width: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=1e-6, **kwargs)


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""CLIP's text tower: a causal transformer over BPE tokens, pooled at the end-of-text token.

Radford et al. 2021, sec. 2.4: token and learned position embeddings, pre-norm transformer blocks
with causal (masked) self-attention, a final LayerNorm, and the activation at the end-of-text
token as the text's feature. The blocks are timm's (the same as the image ViT's), so FSDP shards
and checkpoints the text tower block by block like a ViT (`distributed.fsdp`: it has `blocks`).
"""

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 end_token_id: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must divide by the {heads} heads")
        self.context_length, self.end_token_id = context_length, end_token_id
        self.num_features = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        """CLIP's initialisation: small embeddings, and residual projections scaled down with depth
        so the residual stream's variance stays put."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        residual_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= context_length) -> features [B, width] at each text's end token."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens: longer than the text tower's context of {self.context_length}")
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x, is_causal=True)
        x = self.norm(x)
        # The first end token of each row: with causal attention it has seen the whole caption.
        end = (tokens == self.end_token_id).int().argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), end]

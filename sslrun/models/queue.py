"""A first-in first-out queue of embeddings: MoCo's negatives, NNCLR's support set, and what
SwAV's feature queue needs."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Queue(nn.Module):
    """The `size` most recent rows, overwritten oldest first, starting from random unit rows.

    Rows are pushed as the whole global batch, gathered over processes in rank order, so every
    process holds the same queue. The rows and the write position are buffers: they travel in
    checkpoints and a resumed run continues with the same queue."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append `rows` (at most the newest `size` of them are kept)."""
        rows = rows[-len(self):]
        slots = (self.position + torch.arange(rows.shape[0], device=rows.device)) % len(self)
        self.rows[slots] = rows.to(self.rows.dtype)
        self.position.copy_((self.position + rows.shape[0]) % len(self))

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Each query's nearest row by cosine similarity [B, D] (NNCLR's NN(z, Q)); no gradient."""
        rows = F.normalize(self.rows, dim=1)
        return rows[(F.normalize(queries.to(rows.dtype), dim=1) @ rows.T).argmax(dim=1)]

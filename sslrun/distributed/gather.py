"""All-gather that carries gradients, and a gather of unequal row counts for evaluation."""

from typing import List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every process's [B, ...] tensor into [W * B, ...].

    Backward: each process's loss depends on all gathered rows, so the gradient of the local rows
    is the SUM over processes of the gradients they computed for those rows: all-reduce(sum), then
    keep the local slice. (Keeping only the local process's own gradient, or averaging instead of
    summing, is the classic silent bug that scales gradients by 1/W.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each of W processes -> [W * B, ...] in rank order, differentiable.

    Every process must pass the same B (the global batch divides evenly by construction)."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


class _AllReduceWithGrad(torch.autograd.Function):
    """Forward: the sum over processes. Backward: every process's loss depends on the sum, so the
    gradient of the local summand is the sum of the processes' gradients (as _AllGatherWithGrad)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over processes, differentiable: global-batch statistics a loss is built
    from (SIGReg's characteristic functions) without gathering the rows."""
    if not is_distributed():
        return tensor
    return _AllReduceWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over processes (a new tensor; no gradient): global batch statistics."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate row shards of possibly different lengths from all processes, in rank order."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


def _send_receive(tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, to_rank),
                                       dist.P2POp(dist.irecv, received, from_rank)])
    for request in requests:
        request.wait()
    return received


class _ExchangeWithGrad(torch.autograd.Function):
    """Forward: send this process's tensor to `to_rank`, receive `from_rank`'s. Backward: the
    gradient goes back the way the tensor came (to `from_rank`, from `to_rank`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        return _send_receive(tensor.contiguous(), to_rank, from_rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _send_receive(grad.contiguous(), ctx.from_rank, ctx.to_rank), None, None


def exchange_with_neighbours(tensor: torch.Tensor) -> List[torch.Tensor]:
    """[this process's tensor, then the tensors of ranks r-1, r-2, ... ]: W blocks in W - 1 steps
    round the ring, each step passing the last block received to the right-hand neighbour.
    Differentiable: each block's gradient travels back round the ring to its owner.

    SigLIP's way across devices: each process sees every block once without ever holding the
    gathered batch, and the traffic per step is one block per process."""
    blocks = [tensor]
    if not is_distributed():
        return blocks
    world, me = dist.get_world_size(), dist.get_rank()
    for _ in range(world - 1):
        blocks.append(_ExchangeWithGrad.apply(blocks[-1], (me + 1) % world, (me - 1) % world))
    return blocks

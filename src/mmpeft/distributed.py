"""Gathering tensors across processes with gradients (for contrastive losses under DDP).

``gather_rows`` concatenates each process's rows in rank order; shards may differ in size. In the
backward pass the gradient of the gathered tensor is summed over processes (every process's loss
depends on every shard) and each process keeps the slice of its own rows. Without an
initialised process group, or with one process, it returns its input.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def is_main_process() -> bool:
    """Rank 0 of a launch, or not launched distributed; read from the environment that torchrun and
    ``accelerate launch`` set (``RANK``), so it holds before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_padded(x: Tensor) -> tuple[Tensor, list[int]]:
    """(n, ...) per process -> ((W, n_max, ...) zero-padded, [n per process])."""
    dist = torch.distributed
    _, size = world()
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.stack(parts), sizes


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        stacked, sizes = _gather_padded(x)  # (W, n_max, ...)
        ctx.rank, ctx.sizes, ctx.n_max = world()[0], sizes, stacked.shape[1]
        return torch.cat([stacked[w, :n] for w, n in enumerate(sizes)])  # (sum n, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        padded = grad.new_zeros((len(ctx.sizes), ctx.n_max, *grad.shape[1:]))  # (W, n_max, ...)
        for w, part in enumerate(torch.split(grad, ctx.sizes)):
            padded[w, : part.shape[0]] = part
        torch.distributed.all_reduce(padded)  # sum of every process's gradient for every shard
        return padded[ctx.rank, : ctx.sizes[ctx.rank]]


def gather_rows(x: Tensor) -> Tensor:
    """Rows of every process in rank order; gradients flow back to each process's own rows."""
    if world()[1] == 1:
        return x
    if not x.requires_grad:
        stacked, sizes = _gather_padded(x)
        return torch.cat([stacked[w, :n] for w, n in enumerate(sizes)])
    return _GatherRows.apply(x)

"""Image-text contrastive (ITC) loss, CLIP-style and symmetric, with embeddings gathered across processes.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv 2103.00020. Each process scores its own rows against the rows of *every* process (more
negatives per step). ``gather_with_grad`` all-gathers embeddings and, in the backward pass, sums the
gradient of the gathered tensor over processes and hands each process the slice of its own rows:
every process then holds the exact gradient of the global loss for its shard, and averaging
parameter gradients (DDP) gives the gradient of the mean loss. Without an initialised process
group (or with one process) gathering is a no-op.

Positives are defined by item id (``ids``): two rows with the same id (e.g. two captions of one
image in a batch, so the image appears twice) are both positives, never negatives; the target of
each row is uniform over its positives (soft cross-entropy). Without ids, row i pairs with row i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_padded(x: Tensor) -> tuple[Tensor, list[int]]:
    """(n_local, ...) on each process -> ((W, n_max, ...) padded, sizes); batches may differ in size."""
    dist = torch.distributed
    rank, world = _world()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)
    padded = x.new_zeros((n_max, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.stack(out), sizes  # (W, n_max, ...)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, _ = _world()
        stacked, sizes = _all_gather_padded(x)  # (W, n_max, D)
        ctx.rank, ctx.n_max, ctx.sizes = rank, stacked.shape[1], sizes
        return torch.cat([stacked[w, :s] for w, s in enumerate(sizes)])  # (sum n_w, D)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every process's loss depends on every shard: sum the gathered gradient over processes
        padded = grad.new_zeros((len(ctx.sizes), ctx.n_max, *grad.shape[1:]))  # (W, n_max, D)
        start = 0
        for w, s in enumerate(ctx.sizes):
            padded[w, :s] = grad[start : start + s]
            start += s
        torch.distributed.all_reduce(padded)
        return padded[ctx.rank, : ctx.sizes[ctx.rank]]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n_local, ...) over processes in rank order; gradients reach every shard."""
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over processes in rank order (ids, labels); no autograd."""
    if _world()[1] == 1:
        return x
    stacked, sizes = _all_gather_padded(x)
    return torch.cat([stacked[w, :s] for w, s in enumerate(sizes)])


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits)_ij: (n, N), (n, N) -> ()."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def contrastive_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    ids: Tensor | None = None,
    normalize: bool = True,
    gather: bool = True,
) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` (n, D) and ``b`` (n, D), e.g. image and text.

    logits = logit_scale * a_local @ b_all^T (and the same for b against a_all); the loss is the mean
    of the two directions. ``ids`` (n,) integer item ids mark positives (same id = positive).
    Under torch.distributed, ``a``/``b``/``ids`` are the local shard and the candidates are gathered.
    """
    if a.ndim != 2 or b.shape != a.shape:
        raise ValueError(
            f"contrastive_loss: expected two (n, D) tensors of one shape, got {a.shape}, {b.shape}"
        )
    if ids is not None and ids.shape != (a.shape[0],):
        raise ValueError(f"contrastive_loss: ids must have shape ({a.shape[0]},), got {tuple(ids.shape)}")
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    rank, world = _world()
    if gather and world > 1:
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)  # (N, D)
        # offset of this process's rows in the gathered order (rank order)
        sizes = gather_no_grad(torch.tensor([a.shape[0]], device=a.device))
        offset = int(sizes[:rank].sum().item())
    else:
        a_all, b_all, offset = a, b, 0
    n, N = a.shape[0], a_all.shape[0]
    if ids is None:
        targets = torch.zeros(n, N, device=a.device, dtype=a.dtype)
        targets[torch.arange(n), offset + torch.arange(n)] = 1.0
    else:
        ids_all = gather_no_grad(ids) if gather and world > 1 else ids
        pos = (ids[:, None] == ids_all[None, :]).to(a.dtype)  # (n, N)
        targets = pos / pos.sum(-1, keepdim=True)
    logits_ab = logit_scale * a @ b_all.t()  # (n, N): rows of a against every b
    logits_ba = logit_scale * b @ a_all.t()  # (n, N): rows of b against every a
    return 0.5 * (_soft_cross_entropy(logits_ab, targets) + _soft_cross_entropy(logits_ba, targets))


class ContrastiveLoss(nn.Module):
    """``contrastive_loss`` with a temperature: learnable (CLIP: log-parametrised, init 0.07,
    scale clamped at ``max_scale``) or fixed."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ContrastiveLoss: temperature must be > 0, got {temperature}")
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.max_scale = max_scale

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, a: Tensor, b: Tensor, ids: Tensor | None = None) -> Tensor:
        return contrastive_loss(a, b, self.scale, ids=ids)

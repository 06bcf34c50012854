"""Sharded training (``train.fsdp``): the frozen towers split over the processes with FSDP2.

mmpeft trains a few adapters beside large frozen encoders, so what is worth sharding is the frozen
blocks. Every encoder block whose parameters are all frozen becomes its own FSDP2 unit
(``torch.distributed.fsdp.fully_shard``): each process keeps 1/world of its weights and gathers
the rest for the block's forward (and again for its backward, where an adapter above needs the
input gradient). Everything else -- embeddings, final norms, the methods' modules, the head, and a
block that holds trainable parameters (bitfit, full) -- stays whole on every process, and its
gradients are averaged across processes after the backward pass, as DDP would. So the optimizer
state and every checkpointed tensor are ordinary tensors: adapter checkpoints have the single-process
layout, and resuming reads them unchanged.

Why not Accelerate's FSDP wrapping: it shards the whole module behind ``forward``, while mmpeft
also runs blocks from elsewhere (the frozen prefix cache is filled by the main process alone; PMF's
query stage computes a block's tail from its sub-modules), and it maps an FSDP config to plain DDP
on CPUs. Sharding happens after the prefix cache and the head's probe fit are done, with whole blocks.
"""

from __future__ import annotations

import logging
import os
import types

import torch
from torch import nn

from ..encoders.base import Encoder

log = logging.getLogger(__name__)


def fsdp_requested(train_cfg) -> bool:
    """``train.fsdp``, or a launch through ``accelerate launch`` with an FSDP config (whose flag
    ``make_accelerator`` moves to MMPEFT_FSDP, so Accelerate does not wrap the model itself)."""
    env = (os.environ.get(k, "false").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "MMPEFT_FSDP"))
    return bool(train_cfg.fsdp) or any(env)


def shard_frozen_blocks(model: nn.Module) -> dict[str, float]:
    """fully_shard every all-frozen block of every encoder; what was sharded and the parameter MB
    each process holds against the whole model's."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    join_process_group(next(model.parameters()).device)
    sharded = whole = 0
    for enc in model.backbone.encoders.values():
        blocks = [enc.block(i) for i in range(enc.num_layers)]
        for block in blocks:
            if isinstance(block, FSDPModule):  # one module behind two encoders (a video tower's image blocks)
                continue
            if any(p.requires_grad for p in block.parameters()):
                whole += 1  # its trainable parameters stay whole, like the methods' modules
                continue
            fully_shard(block)
            sharded += 1
        if blocks:
            # a family's fast tail path calls a block's sub-modules directly, past FSDP's hooks;
            # the generic one runs the whole block through its forward (PMF's query stage)
            enc.run_block_tail = types.MethodType(Encoder.run_block_tail, enc)
    held, total = parameter_mb(model)
    log.info("fsdp: %d frozen blocks sharded over %d processes, %d kept whole; %.1f of %.1f MB of parameters "
             "held by each process", sharded, torch.distributed.get_world_size(), whole, held, total)  # fmt: skip
    return {"sharded_blocks": sharded, "whole_blocks": whole, "param_mb_per_process": held, "param_mb": total}


def parameter_mb(model: nn.Module) -> tuple[float, float]:
    """(MB of parameters this process holds, MB of the whole model); a sharded one counts its shard."""
    held = total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor: this process's shard
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held / 2**20, total / 2**20


def join_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a single process not started by a launcher gets one of its own."""
    dist = torch.distributed
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "train.fsdp: WORLD_SIZE > 1 but no process group; launch with torchrun or accelerate launch"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters kept whole on every process (one all-reduce).

    A parameter without a gradient on this process counts as zero, as under DDP."""
    world = torch.distributed.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = part.view_as(p).to(p.dtype)

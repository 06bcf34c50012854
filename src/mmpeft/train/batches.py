"""Data order and batching: a seeded permutation per epoch, sharded over processes.

The order of an epoch is a pure function of (seed, epoch), so a resumed run skips the batches
it already saw and then sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..encoders.base import EncoderState


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's batches (lists of example indices) for one epoch.

    Each optimizer-visible global batch holds ``batch_size * world`` examples, split evenly over
    processes; the last one is topped up from the start of the order so every process gets a
    batch of equal size (DDP needs the same number of steps on every process).
    """
    order = epoch_order(n, seed, epoch) if shuffle else list(range(n))
    step = batch_size * world
    batches = []
    for start in range(0, n, step):
        chunk = order[start : start + step]
        if world > 1 and len(chunk) % world:
            chunk = chunk + order[: world - len(chunk) % world]
        per = len(chunk) // world
        batches.append(chunk[rank * per : (rank + 1) * per])
    return batches


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class _Batches:
    """A batch sampler over a fixed list of index batches."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    dataset: Dataset, batches: list[list[int]], collate_fn, num_workers: int = 0, generator=None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=_Batches(batches),
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=generator,
    )


class IndexDataset(Dataset):
    """Items are their own indices (the prefix cache collates from its store)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside batches (dicts, lists, encoder states, tokenizer outputs) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, EncoderState):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return obj.replace(**changes)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "to") and not isinstance(obj, torch.nn.Module):  # e.g. a tokenizer's BatchEncoding
        return obj.to(device)
    return obj

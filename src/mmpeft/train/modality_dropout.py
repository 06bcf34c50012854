"""Modality dropout (``train.modality_dropout``): training examples lose modalities at random, so
that adapters learn to cope with absent ones (``mmpeft.missing``).

Each example drops each modality with that modality's rate, drawn from a generator seeded by
(seed, epoch, batch, process): a resumed run drops exactly what the uninterrupted run dropped.
An example never loses its last modality: where every modality it had was drawn, one of them,
chosen at random, stays. The inputs are untouched (prefix-cached states work as they are); only
the batch's ``absent`` marks change.
"""

from __future__ import annotations

import torch


def drop_modalities(batch: dict, rates: dict[str, float], modalities: list[str], seed: list[int]) -> dict:
    """The batch with ``absent`` marks for the dropped modalities (see the module docstring)."""
    if not rates:
        return batch
    g = torch.Generator().manual_seed(sum(part * 1_000_003**i for i, part in enumerate(seed)) % 2**63)
    B = len(batch["targets"])
    before = batch.get("absent") or {}
    had = torch.stack(
        [~before[m].cpu() if m in before else torch.ones(B, dtype=torch.bool) for m in modalities]
    )
    draws = torch.rand(len(modalities), B, generator=g)  # (M, B), drawn for every modality: stable order
    limit = torch.tensor([rates.get(m, 0.0) for m in modalities]).unsqueeze(1)  # (M, 1)
    keep = had & (draws >= limit)
    lost_all = ~keep.any(0)  # (B,) examples whose every remaining modality was drawn
    if bool(lost_all.any()):
        choice = torch.rand(len(modalities), B, generator=g) * had  # a random modality it had
        saved = torch.nn.functional.one_hot(choice.argmax(0), len(modalities)).T.bool()  # (M, B)
        keep = keep | (saved & lost_all)
    absent = {m: ~keep[i] for i, m in enumerate(modalities) if bool((~keep[i]).any())}
    return {**batch, "absent": absent} if absent else batch

"""Prefix caching (DESIGN §5): the frozen prefix's states, computed once per example.

When every trainable module acts at schedule step s > 0 or later, the states entering step s are
a pure function of the input (frozen encoders run in eval mode, without dropout). The trainer
then computes ``backbone.run_steps(backbone.embed(x), 0, s)`` once per example and trains from
this in-memory cache. Each example's rows are stored trimmed of trailing padding and re-padded
per batch, so any batch composition gives the states an uncached batch would give.

Requirements (checked): the reader does not augment, the encoders keep no per-batch ``extras``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..data.base import collate_examples
from ..encoders.base import EncoderState
from .batches import sequential_batches, to_device

log = logging.getLogger("mmpeft")


class CacheError(ValueError):
    """Prefix caching cannot be used for this model or data; the message says why."""


class TrainModule(nn.Module):
    """What the accelerator wraps: the model's forward from raw inputs or from cached states."""

    def __init__(self, model: nn.Module, start_step: int = 0):
        super().__init__()
        self.model = model
        self.start_step = start_step

    def forward(
        self, inputs: dict[str, Any], cached: bool = False, ids: list | None = None
    ) -> dict[str, Any]:
        if not cached:
            return self.model(inputs, ids=ids)
        return self.model(states=inputs, start_step=self.start_step, ids=ids)


def cacheable_step(model: nn.Module, reader: Any) -> int:
    """The schedule step s to cache up to; raises CacheError when caching would change results."""
    s = model.backbone.first_trainable_step()
    if s <= 0:
        raise CacheError(
            f"prefix caching needs a frozen prefix, but trainable modules act at step {s} "
            "(the embeddings or the first block); set train.prefix_cache=false"
        )
    if reader.augments:
        raise CacheError(f"prefix caching needs fixed inputs, but dataset {reader.name!r} augments them")
    return s


class PrefixCache:
    """Per-example states at step ``step`` of one split, plus targets and ids."""

    def __init__(self, step: int):
        self.step = step
        self.rows: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        self.layout: dict[str, tuple[int, int]] = {}  # modality -> (n_prefix, n_prompt)
        self.targets: list[Any] = []
        self.ids: list[Any] = []

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    @torch.no_grad()
    def build(cls, model, dataset, step: int, batch_size: int, device, autocast) -> PrefixCache:
        cache = cls(step)
        was_training = model.training
        model.eval()
        bb = model.backbone
        try:
            for idx in sequential_batches(len(dataset), batch_size):
                batch = collate_examples([dataset[i] for i in idx], bb.encoders)
                with autocast():
                    states = bb.run_steps(bb.embed(to_device(batch["inputs"], device)), 0, step)
                for m, state in states.items():
                    cache.add_rows(m, state)
                cache.targets += batch["targets"]
                cache.ids += batch["ids"]
        finally:
            model.train(was_training)
        return cache

    def add_rows(self, modality: str, state: EncoderState) -> None:
        if state.extras:
            raise CacheError(
                f"prefix caching: encoder {modality!r} keeps per-batch extras {sorted(state.extras)}; "
                "set train.prefix_cache=false"
            )
        layout = (state.n_prefix, state.n_prompt)
        if self.layout.setdefault(modality, layout) != layout:
            raise CacheError(f"prefix caching: encoder {modality!r} changes its token layout between batches")
        rows = self.rows.setdefault(modality, [])
        tokens = state.tokens.detach().cpu()  # (B, T, D)
        pad = None if state.pad_mask is None else state.pad_mask.cpu()  # (B, T)
        for b in range(tokens.shape[0]):
            if pad is None:
                rows.append((tokens[b].clone(), None))
                continue
            real = (~pad[b]).nonzero()
            n = int(real.max()) + 1 if len(real) else 1  # keep up to the last real token
            rows.append((tokens[b, :n].clone(), pad[b, :n].clone()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in self.rows.values() for t, _ in rows)

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Cached examples -> {"inputs": {m: EncoderState}, "targets", "ids", "cached": True}."""
        inputs = {}
        for m, rows in self.rows.items():
            picked = [rows[i] for i in indices]
            n_prefix, n_prompt = self.layout[m]
            inputs[m] = EncoderState(*_pad_rows(picked), n_prefix=n_prefix, n_prompt=n_prompt)
        return {
            "inputs": inputs,
            "targets": [self.targets[i] for i in indices],
            "ids": [self.ids[i] for i in indices],
            "cached": True,
        }


def _pad_rows(rows: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Rows (T_i, D) with masks (T_i,) -> tokens (B, T, D) zero-padded and pad mask (B, T)."""
    if all(p is None for _, p in rows) and len({t.shape[0] for t, _ in rows}) == 1:
        return torch.stack([t for t, _ in rows]), None
    T = max(t.shape[0] for t, _ in rows)
    first = rows[0][0]
    tokens = first.new_zeros(len(rows), T, first.shape[-1])
    pad = torch.ones(len(rows), T, dtype=torch.bool)
    for b, (t, p) in enumerate(rows):
        tokens[b, : t.shape[0]] = t
        pad[b, : t.shape[0]] = False if p is None else p
    return tokens, pad

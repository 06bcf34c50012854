"""Perturbed evaluation inputs (``mmpeft eval --noise MODALITY=LEVEL --missing MODALITY=RATE``).

Gaussian noise is added to a modality's raw input (a waveform, a feature array, an image's pixels
in [0, 1]) with standard deviation LEVEL times the input's own standard deviation, drawn per
example from a generator seeded by (seed, example index, modality), so an evaluation is
reproducible and independent of batch order. Images stay images (clipped to [0, 1], 8-bit); text
has no numeric form to add noise to and is refused by name.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import numpy as np
import torch

from .base import DataError, open_image


def parse_levels(items: list[str] | None, flag: str) -> dict[str, float]:
    """``["image=0.5", "audio=1"]`` (or comma-joined) -> {"image": 0.5, "audio": 1.0}."""
    out: dict[str, float] = {}
    for item in (part for text in items or () for part in text.split(",") if part.strip()):
        name, sep, value = item.partition("=")
        try:
            level = float(value)
        except ValueError:
            level = float("nan")
        if not sep or not name.strip() or not np.isfinite(level) or level < 0:
            raise DataError(f"{flag} {item!r}: expected MODALITY=LEVEL with a number >= 0, e.g. image=0.5")
        out[name.strip()] = level
    return out


def add_noise(x: Any, level: float, rng: np.random.Generator, where: str) -> Any:
    """``x`` plus N(0, (level * std(x))^2) noise, in ``x``'s own form."""
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(add_noise(x.detach().cpu().numpy(), level, rng, where), dtype=x.dtype)
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.number):
        return (x + rng.normal(0.0, level * float(x.std()), x.shape)).astype(x.dtype)
    if isinstance(x, str) and os.path.isfile(x):  # an image path (readers that leave loading to the tower)
        x = open_image(x, where)
    if hasattr(x, "convert") and hasattr(x, "mode"):  # a PIL image: noise on its pixels in [0, 1]
        from PIL import Image

        pixels = np.asarray(x.convert("RGB"), dtype=np.float32) / 255.0
        noisy = np.clip(pixels + rng.normal(0.0, level * pixels.std(), pixels.shape), 0.0, 1.0)
        return Image.fromarray((noisy * 255.0 + 0.5).astype(np.uint8))
    raise DataError(f"{where}: cannot add noise to a {type(x).__name__} input (text has no numeric form)")


class NoisyDataset(torch.utils.data.Dataset):
    """A split whose examples carry noise on the given modalities (see the module docstring)."""

    def __init__(self, dataset, levels: dict[str, float], seed: int = 0):
        self.dataset, self.levels, self.seed = dataset, levels, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ex = self.dataset[i]
        inputs = dict(ex["inputs"])
        for m, level in self.levels.items():
            if level > 0:
                rng = np.random.default_rng([self.seed, i, zlib.crc32(m.encode())])
                inputs[m] = add_noise(inputs[m], level, rng, f"example {ex.get('id')!r}, modality {m!r}")
        return {**ex, "inputs": inputs}


class MissingDataset(torch.utils.data.Dataset):
    """A split whose examples lack modalities at the given rates (``mmpeft eval --missing``).

    Each example loses each listed modality when a uniform draw from a generator seeded by (seed,
    example index, modality) falls below the rate, so an evaluation is reproducible and a higher
    rate removes a superset of what a lower one removed. The input stays in place as the stand-in
    (``data.base.lacks``) and the example is marked (``example["absent"]``). An example never loses
    its last modality: where every one it had was drawn, the one drawn highest stays."""

    def __init__(self, dataset, rates: dict[str, float], seed: int = 0):
        bad = {m: r for m, r in rates.items() if r > 1}
        if bad:
            raise DataError(f"--missing rates are fractions in [0, 1], got {bad}")
        self.dataset, self.rates, self.seed = dataset, rates, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ex = self.dataset[i]
        already = set(ex.get("absent", ()))
        had = [m for m, x in ex["inputs"].items() if x is not None and m not in already]
        return {**ex, "absent": sorted(already | drawn_missing(i, had, self.rates, self.seed))}


def drawn_missing(i: int, had: list[str], rates: dict[str, float], seed: int) -> set[str]:
    """The modalities example ``i`` loses of those it ``had`` (see ``MissingDataset``)."""
    draws = {m: np.random.default_rng([seed, i, zlib.crc32(m.encode())]).random() for m in rates}
    lost = {m for m in had if m in rates and draws[m] < rates[m]}
    if had and lost == set(had):
        lost.discard(max(had, key=lambda m: draws[m]))
    return lost

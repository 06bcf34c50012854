"""The dataset-reader interface (DESIGN §4).

A reader is a registered class built from its config dataclass. ``split(name)`` returns a
map-style ``torch.utils.data.Dataset`` whose items are examples::

    {"inputs": {modality: raw item}, "target": label / value / answer index, "id": str}

Raw items are what the encoders' ``collate`` accepts: a string (text), a PIL image or image
path, a 1-D waveform array with ``sampling_rate`` known to the reader, or a (T, F) feature
array. Retrieval examples carry ``"id"`` = the item id that defines positives (an image id
shared by its captions). Bad data raises ``DataError`` naming the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch.utils.data import Dataset


class DataError(ValueError):
    """A data problem; the message names the file and the row."""


@dataclass
class ReaderConfig:
    root: str = ""
    """Directory (or file) holding the dataset in its published format."""


class DatasetReader:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[ReaderConfig]] = ReaderConfig
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg

    @property
    def modalities(self) -> list[str]:
        """Modality names of ``inputs`` (they must match the model's encoders)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Facts a task needs, e.g. ``{"num_classes": 10}`` or ``{"label_names": [...]}``."""
        return {}

    def split(self, name: str) -> Dataset:
        raise NotImplementedError


def collate_examples(examples: list[dict], encoders: dict) -> dict[str, Any]:
    """Examples -> {"inputs": {m: encoder batch}, "targets": list, "ids": list} via each encoder's collate."""
    inputs = {}
    for m, enc in encoders.items():
        items = []
        for ex in examples:
            if m not in ex["inputs"]:
                raise DataError(f"example {ex.get('id')!r} has no {m!r} input; it has {sorted(ex['inputs'])}")
            items.append(ex["inputs"][m])
        inputs[m] = enc.collate(items)
    return {
        "inputs": inputs,
        "targets": [ex.get("target") for ex in examples],
        "ids": [ex.get("id") for ex in examples],
    }

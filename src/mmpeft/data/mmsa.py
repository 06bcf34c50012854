"""`mmsa`: CMU-MOSI / CMU-MOSEI / CH-SIMS feature pickles in the MMSA format.

Format (Yu et al., CH-SIMS, ACL 2020; github.com/thuiar/MMSA, ``data_loader.py``): one pickle
holding ``{"train", "valid", "test"}``, each a dict of arrays over N examples:
``text`` (N, T, F) word features or ``text_bert`` (N, 3, T) token ids / mask / segment ids,
``raw_text`` (N,) strings, ``audio`` (N, T_a, F_a), ``vision`` (N, T_v, F_v),
``regression_labels`` (N,) sentiment in [-3, 3] (MOSI/MOSEI) or [-1, 1] (SIMS), ``id`` (N,), and
for unaligned data ``audio_lengths`` / ``vision_lengths`` (N,) valid steps from the start.

The pickle is read with a restricted unpickler that admits only numpy arrays and builtin
containers: a crafted file is a ``DataError``, never code execution. Items: (T, F) float32
arrays for feature keys, a string for ``raw_text``, and for ``text_bert`` a dict of 1-D int64
``input_ids`` / ``attention_mask`` / ``token_type_ids`` cut to the real tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split, load_numpy_pickle

PICKLE_SPLITS = {"train": "train", "val": "valid", "test": "test"}


@dataclass
class MMSAConfig(ReaderConfig):
    """``root`` is the pickle file (e.g. ``MOSI/Processed/unaligned_50.pkl``)."""

    modalities: dict = field(default_factory=lambda: {"text": "text", "audio": "audio", "vision": "vision"})
    """Modality name -> pickle key (``text``, ``text_bert``, ``raw_text``, ``audio``, ``vision``).
    A ``text`` key that is absent falls back to ``text_bert``."""
    label_key: str = "regression_labels"
    """Pickle key of the target values (CH-SIMS also has ``regression_labels_T`` / ``_A`` / ``_V``)."""
    use_lengths: bool = True
    """Cut feature sequences to ``<key>_lengths`` (unaligned data) when the pickle has them."""
    max_steps: int = 0
    """Keep at most this many steps of each feature sequence (0: all)."""
    zero_nonfinite: bool = True
    """Replace -inf / inf / NaN features by 0 (MMSA zeroes the -inf values of COVAREP audio)."""


@register_dataset("mmsa")
class MMSAReader(DatasetReader):
    config_class = MMSAConfig

    def __init__(self, cfg: MMSAConfig):
        super().__init__(cfg)
        if not cfg.modalities:
            raise DataError("mmsa: 'modalities' must map at least one modality to a pickle key")
        self._data: dict | None = None
        self._checked: set[str] = set()

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.modalities)

    def data(self) -> dict:
        if self._data is None:
            path = self.cfg.root
            if os.path.isdir(path):
                raise DataError(f"mmsa: root {path!r} is a directory; give the .pkl file itself")
            data = load_numpy_pickle(path)
            if not isinstance(data, dict):
                raise DataError(
                    f"{path}: expected a dict with 'train'/'valid'/'test', got {type(data).__name__}"
                )
            self._data = data
        return self._data

    def part(self, split: str) -> dict:
        """The pickle's dict of one split, checked once."""
        key = PICKLE_SPLITS[split]
        data = self.data()
        if key not in data or not isinstance(data[key], dict):
            raise DataError(f"{self.cfg.root}: no split {key!r}; the pickle has {sorted(map(str, data))}")
        part = data[key]
        if split not in self._checked:
            self.check(part, key)
            self._checked.add(split)
        return part

    def key_of(self, modality: str, part: dict) -> str:
        key = self.cfg.modalities[modality]
        return "text_bert" if key == "text" and "text" not in part and "text_bert" in part else key

    def check(self, part: dict, split: str) -> None:
        where = f"{self.cfg.root} [{split}]"
        if self.cfg.label_key not in part:
            raise DataError(f"{where}: no label key {self.cfg.label_key!r}; keys: {sorted(part)}")
        labels = np.asarray(part[self.cfg.label_key], dtype=np.float64)
        n = len(labels)
        if labels.reshape(n, -1).shape[1] != 1:
            raise DataError(
                f"{where}: {self.cfg.label_key!r} has shape {labels.shape}, expected (N,) or (N, 1)"
            )
        bad = np.flatnonzero(~np.isfinite(labels.reshape(n)))
        if len(bad):
            raise DataError(f"{where}: row {int(bad[0])} has a missing (non-finite) label")
        for m in self.cfg.modalities:
            key = self.key_of(m, part)
            if key not in part:
                raise DataError(f"{where}: no key {key!r} for modality {m!r}; keys: {sorted(part)}")
            arr = np.asarray(part[key])
            ndim = {"raw_text": 1, "text_bert": 3}.get(key, 3)
            if arr.ndim != ndim or len(arr) != n or (key == "text_bert" and arr.shape[1] != 3):
                want = {"raw_text": "(N,)", "text_bert": "(N, 3, T)"}.get(key, "(N, T, F)")
                raise DataError(f"{where}: {key!r} has shape {arr.shape}, expected {want} with N = {n}")
            lengths = f"{key}_lengths"
            if self.cfg.use_lengths and lengths in part and len(part[lengths]) != n:
                raise DataError(f"{where}: {lengths!r} has {len(part[lengths])} entries, expected {n}")
        if "id" in part and len(part["id"]) != n:
            raise DataError(f"{where}: 'id' has {len(part['id'])} entries, expected {n}")

    def info(self) -> dict[str, Any]:
        part = self.part("train")
        dims = {}
        for m in self.cfg.modalities:
            key = self.key_of(m, part)
            if key not in ("raw_text", "text_bert"):
                dims[m] = int(np.asarray(part[key]).shape[-1])
        return {"num_targets": 1, "feature_dims": dims}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        part = self.part(split)
        n = len(part[self.cfg.label_key])
        return ExampleList(n, partial(self.example, split), f"mmsa[{split}]")

    def item(self, part: dict, key: str, i: int) -> Any:
        if key == "raw_text":
            return str(part[key][i])
        if key == "text_bert":
            ids, mask, segments = np.asarray(part[key][i], dtype=np.int64)  # 3 x (T,)
            keep = max(int(mask.sum()), 1)
            return {"input_ids": ids[:keep], "attention_mask": mask[:keep], "token_type_ids": segments[:keep]}
        x = np.asarray(part[key][i], dtype=np.float32)  # (T, F)
        lengths = part.get(f"{key}_lengths")
        if self.cfg.use_lengths and lengths is not None:
            x = x[: max(int(lengths[i]), 1)]
        if self.cfg.max_steps > 0:
            x = x[: self.cfg.max_steps]
        if self.cfg.zero_nonfinite:
            x = np.where(np.isfinite(x), x, np.float32(0.0))
        return x

    def example(self, split: str, i: int) -> dict:
        part = self.part(split)
        inputs = {m: self.item(part, self.key_of(m, part), i) for m in self.cfg.modalities}
        label = float(np.asarray(part[self.cfg.label_key][i]).reshape(-1)[0])
        ident = str(part["id"][i]) if "id" in part else f"{split}/{i}"
        return {"inputs": inputs, "target": label, "id": ident}

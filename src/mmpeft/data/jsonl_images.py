"""`jsonl_images`: image + text classification sets stored as JSON Lines (one record per line).

The layout used by MMBT (Kiela et al., "Supervised Multimodal Bitransformers for Classifying
Images and Text", arXiv 1909.02950) and PMF for UPMC Food-101 (``{"img", "text", "label"}``),
MM-IMDB (``{"img", "text", "genre": [...]}``, multi-label) and, with other field names,
SNLI-VE (``{"Flikr30kID", "sentence2", "gold_label"}`` with images from Flickr30k). Options
name the fields; image paths are relative to ``image_root``.

Labels: strings are mapped through ``label_names`` (default: the sorted labels found in all
the split files); integer labels are class indices. Multi-label targets are multi-hot lists. Examples:
``{"inputs": {image: PIL image or path, text: str}, "target": class index or multi-hot, "id"}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..registry import register_dataset
from .base import (
    DataError,
    DatasetReader,
    ExampleList,
    ReaderConfig,
    canonical_split,
    check_image,
    open_image,
    read_jsonl,
    require_file,
    resolve_path,
)


@dataclass
class JsonlImagesConfig(ReaderConfig):
    """``root`` is the folder holding the split files."""

    files: dict = field(
        default_factory=lambda: {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
    )
    """Split -> JSONL file, relative to ``root``."""
    image_field: str = "img"
    """Record field holding the image path."""
    text_field: str = "text"
    """Record field holding the text."""
    label_field: str = "label"
    """Record field holding the label (a list of labels when ``multilabel``)."""
    id_field: str = ""
    """Record field holding the example id ("": ``<file>:<line>``)."""
    image_root: str = ""
    """Directory image paths are relative to (default: ``root``)."""
    multilabel: bool = False
    """Each record has a list of labels (MM-IMDB genres); targets become multi-hot vectors."""
    label_names: list[str] | None = None
    """Class names in index order (None: the sorted distinct string labels of all the split files)."""
    image_modality: str = "image"
    """Modality name of the images."""
    text_modality: str = "text"
    """Modality name of the texts."""
    load_images: bool = True
    """Open images on access (RGB PIL); False yields their paths (checked to exist)."""


@register_dataset("jsonl_images")
class JsonlImagesReader(DatasetReader):
    config_class = JsonlImagesConfig

    def __init__(self, cfg: JsonlImagesConfig):
        super().__init__(cfg)
        self.splits = tuple(canonical_split(s, ("train", "val", "test"), self.name) for s in cfg.files)
        self.image_root = cfg.image_root or cfg.root
        self._rows: dict[str, list[tuple[str, str, str, Any, int]]] = {}
        self._names: list[str] | None = list(cfg.label_names) if cfg.label_names is not None else None

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.image_modality, self.cfg.text_modality]

    def path_of(self, split: str) -> str:
        files = {
            canonical_split(s, ("train", "val", "test"), self.name): f for s, f in self.cfg.files.items()
        }
        return resolve_path(files[split], self.cfg.root)

    def records(self, split: str) -> list[tuple[int, dict]]:
        path = self.path_of(split)
        records = read_jsonl(path)
        for line, rec in records:
            for key in (self.cfg.image_field, self.cfg.text_field, self.cfg.label_field):
                if rec.get(key) is None:
                    what = "label" if key == self.cfg.label_field else "field"
                    raise DataError(f"{path}, line {line}: missing {what} {key!r}")
        return records

    def label_list(self, rec: dict) -> list:
        value = rec[self.cfg.label_field]
        return list(value) if self.cfg.multilabel and isinstance(value, list) else [value]

    def names(self) -> list[str] | None:
        """Class names; the sorted string labels of all split files when not configured."""
        if self._names is None:
            labels = {lab for s in self.splits for _, rec in self.records(s) for lab in self.label_list(rec)}
            if labels and all(isinstance(x, str) for x in labels):
                self._names = sorted(labels)
        return self._names

    def encode(self, rec: dict, path: str, line: int, index: dict[str, int] | None, n: int | None) -> Any:
        out = []
        for lab in self.label_list(rec):
            if isinstance(lab, str) and index is not None and lab in index:
                out.append(index[lab])
            elif isinstance(lab, int) and not isinstance(lab, bool) and lab >= 0 and (n is None or lab < n):
                out.append(lab)
            else:
                raise DataError(
                    f"{path}, line {line}: unknown label {lab!r} in field {self.cfg.label_field!r}"
                )
        if not self.cfg.multilabel:
            return out[0]
        if n is None:
            raise DataError(f"{path}: multi-label data needs string labels or 'label_names'")
        return [1.0 if k in out else 0.0 for k in range(n)]

    def rows(self, split: str) -> list[tuple[str, str, str, Any, int]]:
        """[(image path, text, id, target, line)] of a split, parsed and checked once."""
        if split not in self._rows:
            names = self.names()
            index = {name: k for k, name in enumerate(names)} if names is not None else None
            n = len(names) if names is not None else None
            path = self.path_of(split)
            rows = []
            for line, rec in self.records(split):
                ident = str(rec.get(self.cfg.id_field, f"{os.path.basename(path)}:{line}"))
                text = rec[self.cfg.text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}, line {line}: field {self.cfg.text_field!r} is not a string")
                image = resolve_path(rec[self.cfg.image_field], self.image_root)
                rows.append((image, text, ident, self.encode(rec, path, line, index, n), line))
            self._rows[split] = rows
        return self._rows[split]

    def info(self) -> dict[str, Any]:
        names = self.names()
        if names is not None:
            n = len(names)
        else:  # integer labels without names: the largest index seen, plus one
            n = 1 + max(int(r[3]) for s in self.splits for r in self.rows(s))
        key = "num_labels" if self.cfg.multilabel else "num_classes"
        return {key: n, "label_names": names or [str(k) for k in range(n)]}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        return ExampleList(len(self.rows(split)), partial(self.example, split), f"jsonl_images[{split}]")

    def check_files(self) -> None:
        for split in self.splits:
            for image, _, ident, _, line in self.rows(split):
                check_image(image, f"{self.path_of(split)}, line {line} (id {ident})")

    def example(self, split: str, i: int) -> dict:
        image, text, ident, target, line = self.rows(split)[i]
        where = f"{self.path_of(split)}, line {line} (id {ident})"
        loaded: Any = open_image(image, where) if self.cfg.load_images else require_file(image, where)
        return {
            "inputs": {self.cfg.image_modality: loaded, self.cfg.text_modality: text},
            "target": target,
            "id": ident,
        }

"""`flickr8k`: the Flickr8k subset layout of ``shared/data/flickr8k_1k`` (image-text retrieval).

Images from Hodosh, Young & Hockenmaier, "Framing Image Description as a Ranking Task", JAIR 2013.
Layout: ``captions.tsv`` (``image_id``, ``caption_idx``, ``caption``), ``splits.tsv``
(``image_id``, ``split``) and ``images/<image_id>``; tab-separated, unquoted. The split file is
normative (600 / 200 / 200 images; all captions of an image share its split).

Examples: one per caption, ``{"inputs": {image: PIL image or path, text: caption}, "target": id,
"id": image_id}``; images are opened on access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    read_csv,
    require_file,
)


@dataclass
class Flickr8kConfig(ReaderConfig):
    """``root`` is the folder holding ``captions.tsv``, ``splits.tsv`` and ``images/``."""

    image_modality: str = "image"
    """Modality name of the images."""
    text_modality: str = "text"
    """Modality name of the captions."""
    max_captions: int = 0
    """Keep at most this many captions per image, lowest ``caption_idx`` first (0: all)."""
    load_images: bool = True
    """Open images on access (RGB PIL); False yields their paths (checked to exist)."""


@register_dataset("flickr8k")
class Flickr8kReader(DatasetReader):
    config_class = Flickr8kConfig

    def __init__(self, cfg: Flickr8kConfig):
        super().__init__(cfg)
        self._pairs: dict[str, list[tuple[str, str]]] | None = None

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.image_modality, self.cfg.text_modality]

    def field(self, row: dict, key: str, path: str, line: int) -> str:
        value = row.get(key)
        if value is None or value == "":
            raise DataError(f"{path}, line {line}: empty or missing column {key!r}")
        return value

    def pairs(self) -> dict[str, list[tuple[str, str]]]:
        """split -> [(image id, caption)] in caption-file order, checked once."""
        if self._pairs is not None:
            return self._pairs
        root = self.cfg.root
        split_path, cap_path = os.path.join(root, "splits.tsv"), os.path.join(root, "captions.tsv")
        split_of: dict[str, str] = {}
        for line, row in read_csv(split_path, "\t"):
            split = self.field(row, "split", split_path, line)
            if split not in self.splits:
                raise DataError(
                    f"{split_path}, line {line}: unknown split {split!r}; expected {list(self.splits)}"
                )
            split_of[self.field(row, "image_id", split_path, line)] = split
        captions: dict[str, list[tuple[int, str]]] = {}
        for line, row in read_csv(cap_path, "\t"):
            image = self.field(row, "image_id", cap_path, line)
            if image not in split_of:
                raise DataError(f"{cap_path}, line {line}: image {image!r} is not in {split_path}")
            try:
                k = int(self.field(row, "caption_idx", cap_path, line))
            except ValueError:
                raise DataError(
                    f"{cap_path}, line {line}: caption_idx {row['caption_idx']!r} is not an integer"
                ) from None
            captions.setdefault(image, []).append((k, self.field(row, "caption", cap_path, line)))
        missing = [i for i in split_of if i not in captions]
        if missing:
            raise DataError(
                f"{split_path}: {len(missing)} image(s) have no caption in {cap_path}, e.g. {missing[0]!r}"
            )
        out: dict[str, list] = {s: [] for s in self.splits}
        for image, caps in captions.items():
            caps = sorted(caps)[: self.cfg.max_captions or None]
            out[split_of[image]] += [(image, c) for _, c in caps]
        self._pairs = out
        return out

    def info(self) -> dict[str, Any]:
        return {"num_items": {s: len({i for i, _ in v}) for s, v in self.pairs().items()}}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        return ExampleList(len(self.pairs()[split]), partial(self.example, split), f"flickr8k[{split}]")

    def check_files(self) -> None:
        for split, pairs in self.pairs().items():
            for image_id in dict.fromkeys(i for i, _ in pairs):
                where = f"{self.cfg.root}: {split} image {image_id}"
                check_image(os.path.join(self.cfg.root, "images", image_id), where)

    def example(self, split: str, i: int) -> dict:
        image_id, caption = self.pairs()[split][i]
        path = os.path.join(self.cfg.root, "images", image_id)
        where = f"{self.cfg.root}: {split} caption {i} (image {image_id})"
        image: Any = open_image(path, where) if self.cfg.load_images else require_file(path, where)
        return {
            "inputs": {self.cfg.image_modality: image, self.cfg.text_modality: caption},
            "target": image_id,
            "id": image_id,
        }

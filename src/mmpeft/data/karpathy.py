"""`karpathy`: COCO / Flickr30k / Flickr8k captions in the Karpathy-split JSON (``dataset_*.json``).

Format (Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image Descriptions",
CVPR 2015, arXiv 1412.2306): ``{"images": [{"filename", "filepath" (COCO only), "imgid",
"cocoid" (COCO only), "split": train|val|test|restval, "sentences": [{"raw", "tokens", ...}]}]}``.

Examples: one per (image, caption) pair, ``{"inputs": {image: PIL image or path, text: caption},
"target": id, "id": id}`` with id = the COCO id (else ``imgid``) shared by all captions of an image,
which is what the retrieval task uses for positives. Images are opened on access.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from ..registry import register_dataset
from .base import (
    DataError,
    DatasetReader,
    ExampleList,
    ReaderConfig,
    canonical_split,
    check_image,
    open_image,
    require_file,
)


@dataclass
class KarpathyConfig(ReaderConfig):
    """``root`` is the JSON file, or a directory holding exactly one ``dataset_*.json``."""

    image_root: str = ""
    """Directory of the images (``<image_root>/<filepath>/<filename>``); default: the JSON's directory."""
    restval: bool = True
    """Add COCO's ``restval`` images to ``train`` (the usual 113k-image training split)."""
    max_captions: int = 0
    """Keep at most this many captions per image (0: all)."""
    text_field: Literal["raw", "tokens"] = "raw"
    """Caption text: the raw sentence, or its ``tokens`` joined by spaces."""
    image_modality: str = "image"
    """Modality name of the images."""
    text_modality: str = "text"
    """Modality name of the captions."""
    load_images: bool = True
    """Open images on access (RGB PIL); False yields their paths (checked to exist)."""


def find_json(root: str) -> str:
    if os.path.isdir(root):
        found = sorted(glob.glob(os.path.join(root, "dataset_*.json")))
        if len(found) != 1:
            raise DataError(f"karpathy: expected one dataset_*.json in {root!r}, found {found or 'none'}")
        return found[0]
    return require_file(root, "karpathy")


@register_dataset("karpathy")
class KarpathyReader(DatasetReader):
    config_class = KarpathyConfig

    def __init__(self, cfg: KarpathyConfig):
        super().__init__(cfg)
        self.path = find_json(cfg.root)
        self.image_root = cfg.image_root or os.path.dirname(os.path.abspath(self.path))
        self._pairs: dict[str, list[tuple[str, str, str]]] | None = None

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.image_modality, self.cfg.text_modality]

    def caption(self, sentence: Any, where: str) -> str:
        if not isinstance(sentence, dict):
            raise DataError(f"{where}: a sentence must be an object with 'raw' or 'tokens'")
        if self.cfg.text_field == "raw" and isinstance(sentence.get("raw"), str):
            return sentence["raw"].strip()
        if isinstance(sentence.get("tokens"), list):
            return " ".join(map(str, sentence["tokens"]))
        raise DataError(f"{where}: sentence has no {self.cfg.text_field!r} text")

    def pairs(self) -> dict[str, list[tuple[str, str, str]]]:
        """split -> [(image path, caption, id)], parsed and checked once."""
        if self._pairs is not None:
            return self._pairs
        try:
            with open(self.path, encoding="utf-8") as f:
                images = json.load(f)["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{self.path}: not a Karpathy-split JSON with an 'images' list ({e})") from None
        out: dict[str, list] = {s: [] for s in self.splits}
        for row, img in enumerate(images):
            where = f"{self.path}, images[{row}]"
            if not isinstance(img, dict) or "filename" not in img or "split" not in img:
                raise DataError(f"{where}: an image needs 'filename' and 'split'")
            split = {"restval": "train" if self.cfg.restval else None}.get(img["split"], img["split"])
            if split is None:
                continue  # restval excluded by the config
            if split not in out:
                raise DataError(f"{where}: unknown split {img['split']!r}")
            sentences = img.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                raise DataError(f"{where} ({img['filename']}): no sentences")
            if self.cfg.max_captions > 0:
                sentences = sentences[: self.cfg.max_captions]
            path = os.path.join(self.image_root, img.get("filepath", ""), img["filename"])
            ident = str(img.get("cocoid", img.get("imgid", img["filename"])))
            for k, s in enumerate(sentences):
                out[split].append((path, self.caption(s, f"{where}.sentences[{k}]"), ident))
        self._pairs = out
        return out

    def info(self) -> dict[str, Any]:
        pairs = self.pairs()
        return {"num_items": {s: len({p[2] for p in v}) for s, v in pairs.items()}}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        return ExampleList(len(self.pairs()[split]), partial(self.example, split), f"karpathy[{split}]")

    def check_files(self) -> None:
        for split, pairs in self.pairs().items():
            for path, _, ident in {p[0]: p for p in pairs}.values():
                check_image(path, f"{self.path}, {split} image id {ident}")

    def example(self, split: str, i: int) -> dict:
        path, caption, ident = self.pairs()[split][i]
        where = f"{self.path}, {split} pair {i} (image id {ident})"
        if self.cfg.load_images:
            image: Any = open_image(path, where)
        else:
            image = require_file(path, where)
        return {
            "inputs": {self.cfg.image_modality: image, self.cfg.text_modality: caption},
            "target": ident,
            "id": ident,
        }

"""`video_text`: video-text retrieval annotations in the MSR-VTT layout, over a folder of clips.

One JSON file per split, a list of ``{"video": "<file>", "caption": "<text>" or ["<text>", ...]}``
(MSR-VTT as released with BLIP / UniAdapter: the train file holds the 9k training videos with their
captions, the test file the 1k-A split, one caption per video). Examples: one per caption,
``{"inputs": {video: path, text: caption}, "target": video, "id": video}`` (captions of one video
are all its positives).

``video_dir`` (default: the annotation folder) holds the clips. With ``digits_from`` (a folder of
MNIST IDX files) a missing set is first built there by ``data.digit_videos`` (the offline
digit-video set); the shipped ``video-digits-*`` configs use it. ``VideoAnnotations`` here is what
this reader and ``video_qa`` share.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split, require_file
from .video import read_clip


@dataclass
class VideoTextConfig(ReaderConfig):
    """``root`` is the folder of the annotation files."""

    files: dict = field(
        default_factory=lambda: {"train": "train.json", "val": "val.json", "test": "test.json"}
    )
    """Split -> annotation file (relative to ``root``); splits without a file are absent."""
    video_dir: str = ""
    """Folder of the clips, relative to ``root`` ("" = ``root``); the ``video`` fields are relative to it."""
    video_modality: str = "video"
    """Modality name of the clips."""
    text_modality: str = "text"
    """Modality name of the captions or questions."""
    digits_from: str | None = None
    """Build the digit-video set (``data.digit_videos``) under ``root`` from this MNIST folder first."""
    train_frames: int = 0
    """> 0: training clips are decoded here and this many frames drawn at random, one per equal
    segment, afresh on every read (augmentation; rules out prefix caching; match the video
    encoder's ``frames``). 0: every split yields paths, sampled uniformly by the encoder."""
    seed: int = 0
    """Seed of the training frame draws."""


class VideoAnnotations(DatasetReader):
    """What both readers share: annotation files per split, clip paths, checks."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._records: dict[str, list[dict]] | None = None
        self.augments = cfg.train_frames > 0
        self._draws = np.random.default_rng(cfg.seed)  # the stream of training frame draws

    def clip(self, row: dict, train: bool, where: str) -> Any:
        """A clip path, or for training with ``train_frames`` its frames drawn one per segment."""
        path = self.video_path(row)
        if not (train and self.cfg.train_frames):
            return path
        seed = int(self._draws.integers(2**63))
        return read_clip(path, self.cfg.train_frames, "segment", seed=seed, where=where)

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.video_modality, self.cfg.text_modality]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(canonical_split(s, ("train", "val", "test"), self.name) for s in self.cfg.files)

    def records(self) -> dict[str, list[dict]]:
        if self._records is None:
            if self.cfg.digits_from:
                from .digit_videos import build_digit_videos

                build_digit_videos(self.cfg.digits_from, self.cfg.root)
            self._records = {}
            for split, name in self.cfg.files.items():
                path = require_file(os.path.join(self.cfg.root, name), f"{self.name} {split} annotations")
                try:
                    with open(path, encoding="utf-8") as f:
                        rows = json.load(f)
                except (OSError, ValueError) as e:
                    raise DataError(f"{path}: not a readable JSON file ({e})") from None
                if not isinstance(rows, list):
                    raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
                self._records[canonical_split(split, ("train", "val", "test"), self.name)] = [
                    self.check_record(r, path, k) for k, r in enumerate(rows)
                ]
        return self._records

    def check_record(self, row: Any, path: str, k: int) -> dict:
        keys = self.required
        if not isinstance(row, dict) or any(row.get(key) in (None, "", []) for key in keys):
            raise DataError(f"{path}, record {k}: expected an object with {list(keys)}, got {row!r:.200}")
        return row

    def video_path(self, row: dict) -> str:
        return os.path.join(self.cfg.root, self.cfg.video_dir, row["video"])

    def check_files(self) -> None:
        """Each clip once (a clip has several captions, questions or moments), named by its first record."""
        from .video import check_clip

        for split, rows in self.records().items():
            seen = set()
            for k, row in enumerate(rows):
                path = self.video_path(row)
                if path not in seen:
                    seen.add(path)
                    check_clip(path, f"{self.cfg.files[split]}, record {k}")


@register_dataset("video_text")
class VideoTextReader(VideoAnnotations):
    config_class = VideoTextConfig
    required = ("video", "caption")

    def pairs(self, split: str) -> list[tuple[str, str]]:
        out = []
        for row in self.records()[split]:
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            out += [(row["video"], c) for c in captions]
        return out

    def info(self) -> dict[str, Any]:
        return {"num_items": {s: len({r["video"] for r in rows}) for s, rows in self.records().items()}}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        pairs = self.pairs(split)
        return ExampleList(len(pairs), partial(self.example, pairs, split == "train"), f"video_text[{split}]")

    def example(self, pairs: list, train: bool, i: int) -> dict:
        video, caption = pairs[i]
        clip = self.clip({"video": video}, train, f"caption {i} (video {video})")
        return {
            "inputs": {self.cfg.video_modality: clip, self.cfg.text_modality: caption},
            "target": video,
            "id": video,
        }

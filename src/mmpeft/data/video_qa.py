"""`video_qa`: open-ended VideoQA annotations (MSRVTT-QA / MSVD-QA layout), over a folder of clips.

One JSON file per split, a list of ``{"video", "question", "answer"}`` (as released with ALPRO /
UniAdapter). The answer vocabulary is the training split's answers (the ``max_answers`` most
frequent, ties by first appearance); a val/test answer outside it is kept and scores 0, as in
open-ended VideoQA. Examples: ``{"inputs": {video: path, text: question}, "target": answer,
"id": "<file>:<k>"}``; one gold answer per question scores 1 in the ``vqa`` task (not the 1/3 of
one annotator out of VQA's ten). Clip folder, ``digits_from`` and ``train_frames`` as in
``video_text``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..registry import register_dataset
from .base import DataError, ExampleList, canonical_split
from .video_text import VideoAnnotations, VideoTextConfig


@dataclass
class VideoQAConfig(VideoTextConfig):
    files: dict = field(
        default_factory=lambda: {"train": "qa_train.json", "val": "qa_val.json", "test": "qa_test.json"}
    )
    """Split -> annotation file (relative to ``root``)."""
    max_answers: int = 0
    """Answer vocabulary size: the most frequent training answers (0: all of them)."""


@register_dataset("video_qa")
class VideoQAReader(VideoAnnotations):
    config_class = VideoQAConfig
    required = ("video", "question", "answer")

    def answers(self) -> list[str]:
        counts = Counter(str(r["answer"]) for r in self.records()["train"])
        ranked = sorted(counts, key=lambda a: -counts[a])  # stable: ties keep first appearance
        return ranked[: self.cfg.max_answers or None]

    def info(self) -> dict[str, Any]:
        if "train" not in self.records():
            raise DataError(
                f"{self.name}: the answer vocabulary comes from the train split, which has no file"
            )
        return {"answers": self.answers()}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        rows = self.records()[split]
        return ExampleList(len(rows), partial(self.example, rows, split == "train"), f"video_qa[{split}]")

    def example(self, rows: list, train: bool, i: int) -> dict:
        row = rows[i]
        clip = self.clip(row, train, f"question {i} (video {row['video']})")
        inputs = {self.cfg.video_modality: clip, self.cfg.text_modality: row["question"]}
        return {"inputs": inputs, "target": str(row["answer"]), "id": f"{row['video']}:{i}"}

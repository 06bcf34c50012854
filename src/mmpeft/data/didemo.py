"""`didemo`: DiDeMo paragraph-to-video retrieval from the released moment annotations.

DiDeMo: Hendricks et al., "Localizing Moments in Video with Natural Language", ICCV 2017,
arXiv 1708.01641; the files of its LocalizingMoments repository: ``train_data.json``,
``val_data.json``, ``test_data.json``, each a list of moments ``{"annotation_id", "description",
"video", "times": [[start, end], ...] (one 5-second-segment span per annotator), ...}``.
Paragraph retrieval (the video-text retrieval protocol of ClipBERT, Lei et al., CVPR 2021,
arXiv 2102.06183, and of UniAdapter) joins all descriptions of a video into one paragraph that
is retrieved against the whole video. Order inside the paragraph (our choice; the protocol papers
do not fix it): by the moment's earliest annotated start, then by annotation id.

Examples: one per video, ``{"inputs": {video: path, text: paragraph}, "target": video, "id": video}``.
``video_ext`` replaces the clip's extension (the released ids end in the Flickr file's, e.g.
``.mov``; copies are often re-encoded to ``.mp4``). Clip folder and ``train_frames`` as in
``video_text``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..registry import register_dataset
from .video_text import VideoTextConfig, VideoTextReader


@dataclass
class DiDeMoConfig(VideoTextConfig):
    files: dict = field(
        default_factory=lambda: {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
    )
    """Split -> the released annotation file (relative to ``root``)."""
    video_ext: str = ""
    """Replace each clip's extension with this one (e.g. ".mp4"); "" keeps the released name."""


def moment_start(row: dict) -> float:
    times = row.get("times") or []
    starts = [t[0] for t in times if isinstance(t, (list, tuple)) and t]
    return float(min(starts)) if starts else 0.0


@register_dataset("didemo")
class DiDeMoReader(VideoTextReader):
    """``video_text`` with one (video, paragraph) pair per video instead of one per caption."""

    config_class = DiDeMoConfig
    required = ("video", "description")

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(video, paragraph) per video of the split, videos in order of first appearance."""
        moments: dict[str, list[dict]] = {}
        for row in self.records()[split]:
            moments.setdefault(row["video"], []).append(row)
        out = []
        for video, rows in moments.items():
            rows = sorted(rows, key=lambda r: (moment_start(r), str(r.get("annotation_id", ""))))
            out.append((video, " ".join(str(r["description"]).strip() for r in rows)))
        return out

    def video_path(self, row: dict) -> str:
        name = row["video"]
        if self.cfg.video_ext:
            name = os.path.splitext(name)[0] + self.cfg.video_ext
        return os.path.join(self.cfg.root, self.cfg.video_dir, name)

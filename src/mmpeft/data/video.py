"""Video clips: decoding, frame sampling and writing, through PyAV (``pip install 'mmpeft[video]'``).

PyAV binds FFmpeg, so every container and codec FFmpeg reads works (MP4, WebM, AVI, GIF, ...).
Clips here are short (seconds): a clip is decoded whole into RGB frames and N of them are kept.

Sampling N frames of a clip of L frames (``sample_indices``):
- ``uniform`` (evaluation): the middle frame of each of N equal segments;
- ``segment`` (training): one frame drawn at random inside each of N equal segments, from a
  generator the caller seeds, so a run is reproducible;
- a clip shorter than N frames repeats frames (each segment still maps to a frame).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from ..optional import require
from .base import DataError


def sample_indices(
    length: int, n: int, mode: str = "uniform", rng: np.random.Generator | None = None
) -> list[int]:
    """N frame indices of a clip of ``length`` frames (see the module docstring)."""
    if length < 1:
        raise ValueError("a clip needs at least one frame")
    if n < 1:
        raise ValueError(f"frames must be >= 1, got {n}")
    edges = np.linspace(0.0, float(length), n + 1)  # segment k is [edges[k], edges[k + 1])
    if mode == "uniform":
        points = (edges[:-1] + edges[1:]) / 2.0
    elif mode == "segment":
        rng = rng if rng is not None else np.random.default_rng(0)
        points = edges[:-1] + rng.random(n) * (edges[1:] - edges[:-1])
    else:
        raise ValueError(f"sampling mode {mode!r} is not one of 'uniform', 'segment'")
    return [min(length - 1, int(p)) for p in points]


def decode_frames(path: str, where: str = "", limit: int | None = None) -> np.ndarray:
    """The frames of the clip's first video stream (the first ``limit`` of them, or all) as
    (L, H, W, 3) uint8 RGB; a missing, undecodable or frameless clip is a DataError."""
    av = require("av", "video")
    where = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise DataError(f"{where}video {path!r} not found")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"{where}{path!r} has no video stream")
            decoded = itertools.islice(container.decode(video=0), limit)
            frames = [f.to_ndarray(format="rgb24") for f in decoded]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{where}cannot decode video {path!r} ({e})") from None
    if not frames:
        raise DataError(f"{where}video {path!r} has no frames")
    return np.stack(frames)


def read_clip(
    path: str, n: int, mode: str = "uniform", seed: int | None = None, where: str = ""
) -> np.ndarray:
    """N sampled frames of a clip, (N, H, W, 3) uint8; ``seed`` seeds ``segment`` sampling."""
    frames = decode_frames(path, where)
    rng = np.random.default_rng(seed) if mode == "segment" else None
    return frames[sample_indices(len(frames), n, mode, rng)]


def check_clip(path: str, where: str = "") -> None:
    """The clip exists, opens and has a video stream with a first frame (a quick check)."""
    decode_frames(path, where, limit=1)


def write_clip(path: str, frames: Any, fps: int = 8, codec: str = "mpeg4") -> None:
    """Write (L, H, W, 3) uint8 RGB frames as a video file (container from the extension)."""
    av = require("av", "video")
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (L, H, W, 3), got {frames.shape}")
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    os.replace(tmp, path)

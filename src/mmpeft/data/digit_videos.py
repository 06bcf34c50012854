"""A small video-text set made offline from real MNIST digits: a digit moving across a canvas.

Each clip is one MNIST digit (28x28, white on black) moving in a straight line across a 64x64
canvas in one of 8 directions, over ``frames`` frames, written as MP4 with PyAV. Captions say
what moves and where ("a 7 moving down and to the left"); the two questions of a clip are
"which digit is moving?" (answer "7") and "which way does it move?" ("down and to the left").

Splits are fixed by the MNIST pools of ``shared/data/mnist`` (``data.mnist``): train and val
clips take digits of the train/val pool (indices before 5000; val the last 500 of it), test clips
digits of the test pool, so no test digit image is ever seen in training. Directions, digits and
start offsets are drawn from a generator seeded by (seed, split).

Layout written under ``out``: ``clips/<split>_<k>.mp4``, ``<split>.json`` for retrieval
(``[{"video": "clips/...", "caption": "..."}]``, the MSR-VTT annotation layout) and
``qa_<split>.json`` for question answering (``[{"video", "question", "answer"}]``, the
MSRVTT-QA layout), and ``build.json`` with the settings; a finished folder is reused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..checkpoint import atomic_write_bytes
from .mnist import IMAGES_FILE, LABELS_FILE, read_idx
from .video import write_clip

DIRECTIONS = {  # (dy, dx) per frame step direction -> words
    (-1, 0): "up",
    (1, 0): "down",
    (0, -1): "to the left",
    (0, 1): "to the right",
    (-1, -1): "up and to the left",
    (-1, 1): "up and to the right",
    (1, -1): "down and to the left",
    (1, 1): "down and to the right",
}
SIZES = {"train": 800, "val": 200, "test": 400}


def moving_digit(digit: np.ndarray, direction: tuple[int, int], frames: int, size: int, rng) -> np.ndarray:
    """(frames, size, size, 3) uint8: the digit moving along ``direction`` across the canvas."""
    span = size - digit.shape[0]  # positions 0..span keep the digit inside the canvas
    dy, dx = direction

    def path(d: int) -> np.ndarray:
        if d == 0:  # still along this axis: a random fixed position
            return np.full(frames, rng.integers(0, span + 1))
        start, stop = (0, span) if d > 0 else (span, 0)
        return np.linspace(start, stop, frames).round().astype(int)

    ys, xs = path(dy), path(dx)
    clip = np.zeros((frames, size, size), np.uint8)
    h, w = digit.shape
    for k in range(frames):
        clip[k, ys[k] : ys[k] + h, xs[k] : xs[k] + w] = digit
    return np.repeat(clip[..., None], 3, axis=-1)


def build_digit_videos(
    mnist_root: str, out: str, frames: int = 8, size: int = 64, seed: int = 0, sizes=None
) -> str:
    """Write the set under ``out`` (see the module docstring) unless it is already there; returns ``out``."""
    sizes = dict(sizes or SIZES)
    settings = {"frames": frames, "size": size, "seed": seed, "sizes": sizes, "format": 1}
    done = os.path.join(out, "build.json")
    if os.path.isfile(done):
        with open(done) as f:
            if json.load(f) == settings:
                return out
    images = read_idx(os.path.join(mnist_root, IMAGES_FILE), 0x00000803)
    labels = read_idx(os.path.join(mnist_root, LABELS_FILE), 0x00000801)
    pools = {"train": np.arange(0, 4500), "val": np.arange(4500, 5000), "test": np.arange(5000, len(images))}
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    names = list(DIRECTIONS)
    for split, n in sizes.items():
        rng = np.random.default_rng([seed, ["train", "val", "test"].index(split)])
        picks = rng.choice(pools[split], size=n, replace=n > len(pools[split]))
        retrieval, qa = [], []
        for k, index in enumerate(picks):
            direction = names[int(rng.integers(len(names)))]
            clip = moving_digit(images[index], direction, frames, size, rng)
            video = f"clips/{split}_{k:04d}.mp4"
            write_clip(os.path.join(out, video), clip, fps=frames)
            digit, words = str(int(labels[index])), DIRECTIONS[direction]
            retrieval.append({"video": video, "caption": f"a {digit} moving {words}"})
            qa.append({"video": video, "question": "which digit is moving?", "answer": digit})
            qa.append({"video": video, "question": "which way does it move?", "answer": words})
        atomic_write_bytes(os.path.join(out, f"{split}.json"), json.dumps(retrieval, indent=0).encode())
        atomic_write_bytes(os.path.join(out, f"qa_{split}.json"), json.dumps(qa, indent=0).encode())
    atomic_write_bytes(done, json.dumps(settings).encode())
    return out

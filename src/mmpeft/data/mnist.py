"""`mnist`: MNIST digits from the IDX ``.gz`` files of ``shared/data/mnist`` (the t10k set).

Format (LeCun et al., yann.lecun.com/exdb/mnist): a gzip-compressed IDX file is a big-endian
header (two zero bytes, a type code, the number of dimensions, one uint32 per dimension) and the
row-major values; images are uint8 (N, 28, 28) with magic 0x00000803, labels uint8 (N,) with
magic 0x00000801. The files are parsed here with numpy + gzip; a wrong magic number, a
truncated or over-long body, or a corrupt gzip stream is a DataError naming the file.

Splits follow ``shared/data/mnist/README.md``: indices before ``test_start`` (5000) are the
train/val pool of AV-MNIST, the rest its test pool. ``val`` is the last ``val_size`` images of
the train/val pool, ``train`` the ones before: fixed, no shuffling.

Noise mirrors ``shared/data/avmnist/build.py`` so an image tower can be pre-trained on images
that look like AV-MNIST's: the input is ``image / 255 + noise_sigma * noise`` (not clipped in the
``array`` format) with ``noise = RandomState(noise_seed).standard_normal((N, 28, 28))``, row i for
MNIST index i. Numpy's legacy ``RandomState`` stream is frozen, so every image's noise is the
same on every run, in every split and on every numpy version; it is never redrawn, so the reader
does not ``augment``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split, require_file

IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
# IDX type code -> big-endian numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class MNISTConfig(ReaderConfig):
    """``root`` is the folder holding the two IDX ``.gz`` files."""

    images_file: str = IMAGES_FILE
    """Image file name in ``root`` (IDX, magic 0x00000803)."""
    labels_file: str = LABELS_FILE
    """Label file name in ``root`` (IDX, magic 0x00000801)."""
    test_start: int = 5000
    """First index of the test pool; the indices before it are the train/val pool (README split)."""
    val_size: int = 500
    """Number of images at the end of the train/val pool that form ``val`` (0: an empty val split)."""
    image_format: Literal["array", "pil"] = "array"
    """``array``: float32 (28, 28) ``image / 255`` plus noise; ``pil``: that image clipped to [0, 1]
    as an 8-bit RGB PIL image, for image encoders (as the ``avmnist`` reader does)."""
    noise_sigma: float = 0.0
    """Standard deviation of the fixed Gaussian pixel noise (0: clean images; AV-MNIST uses 1.0)."""
    noise_seed: int = 2
    """Seed of the noise stream. Not AV-MNIST's seed 1, whose rows belong to AV-MNIST samples: with
    another seed no MNIST image shares its exact noise field with an AV-MNIST input."""
    modality: str = "image"
    """Modality name of the digit images."""
    canvas: int = 0
    """> 0: each digit is placed on a black canvas of this size, at a position drawn per image
    from a generator seeded by (noise_seed, index) (fixed, never redrawn): what a frame of the
    digit-video set (``data.digit_videos``) looks like."""
    train_noise: Literal["fixed", "fresh"] = "fixed"
    """``fresh``: the train split draws new noise every time an image is read (augmentation for
    pre-training an image tower: a fixed noise field is memorised); val and test keep the fixed
    noise. Fresh noise rules out prefix caching."""


def read_idx(path: str, magic: int) -> np.ndarray:
    """The array of a gzip-compressed IDX file whose 4-byte magic number must be ``magic``."""
    require_file(path, "mnist")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise DataError(f"{path}: IDX magic number {found!r}, expected {magic:#010x}")
    ndim = data[3]
    dtype = np.dtype(IDX_TYPES[data[2]]) if data[2] in IDX_TYPES else None
    header = 4 + 4 * ndim
    if dtype is None or len(data) < header:
        raise DataError(f"{path}: truncated or unsupported IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: {len(data)} bytes, expected {expected} for shape {shape} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def on_canvas(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(28, 28) -> (size, size) zeros with ``x`` at a random position inside."""
    h, w = x.shape
    if size < max(h, w):
        raise DataError(f"mnist: canvas {size} is smaller than the {h}x{w} digits")
    y0, x0 = (int(v) for v in rng.integers(0, size - max(h, w) + 1, size=2))
    out = np.zeros((size, size), dtype=x.dtype)
    out[y0 : y0 + h, x0 : x0 + w] = x
    return out


def pixel_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """AV-MNIST's fixed unit-variance noise recipe: float32 ``RandomState(seed).standard_normal(shape)``."""
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


@register_dataset("mnist")
class MNISTReader(DatasetReader):
    config_class = MNISTConfig
    augments = False  # the noise is fixed per image, never redrawn

    def __init__(self, cfg: MNISTConfig):
        super().__init__(cfg)
        self.augments = cfg.train_noise == "fresh" and cfg.noise_sigma > 0
        self._fresh = np.random.default_rng(cfg.noise_seed + 1)  # the stream of fresh train noise
        if not 0 <= cfg.val_size <= cfg.test_start:
            raise DataError(f"mnist: val_size {cfg.val_size} must be in [0, test_start = {cfg.test_start}]")
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.modality]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) float32 model-input images (noise added) and (N,) int64 labels."""
        if self._arrays is None:
            self._arrays = self.load()
        return self._arrays

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        images_path = os.path.join(self.cfg.root, self.cfg.images_file)
        labels_path = os.path.join(self.cfg.root, self.cfg.labels_file)
        images, labels = read_idx(images_path, 0x0803), read_idx(labels_path, 0x0801)
        if len(labels) != len(images):
            raise DataError(
                f"{labels_path}: {len(labels)} labels, but {images_path!r} has {len(images)} images"
            )
        bad = np.flatnonzero(labels > 9)
        if len(bad):
            raise DataError(
                f"{labels_path}: row {int(bad[0])} has label {int(labels[bad[0]])}, not a digit 0-9"
            )
        if not self.cfg.test_start < len(images):
            raise DataError(
                f"{images_path}: {len(images)} images, none left for test_start {self.cfg.test_start}"
            )
        x = images.astype(np.float32) / 255.0
        self._clean = x
        if self.cfg.noise_sigma:
            x = x + np.float32(self.cfg.noise_sigma) * pixel_noise(self.cfg.noise_seed, images.shape)
        return x, labels.astype(np.int64)

    def info(self) -> dict[str, Any]:
        return {"num_classes": 10, "label_names": [str(k) for k in range(10)]}

    def indices(self, split: str) -> range:
        """MNIST indices of a canonical split."""
        start_val = self.cfg.test_start - self.cfg.val_size
        if split == "train":
            return range(start_val)
        if split == "val":
            return range(start_val, self.cfg.test_start)
        return range(self.cfg.test_start, len(self.arrays()[1]))

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        self.arrays()  # read and check the files before handing out a dataset
        rows = self.indices(split)
        fresh = self.augments and split == "train"
        return ExampleList(len(rows), partial(self.example, rows, fresh), f"mnist[{split}]")

    def image(self, r: int, fresh: bool = False) -> Any:
        x = self.arrays()[0][r]  # (28, 28)
        if fresh:
            noise = self._fresh.standard_normal(x.shape).astype(np.float32)
            x = self._clean[r] + np.float32(self.cfg.noise_sigma) * noise
        if self.cfg.canvas:
            x = on_canvas(x, self.cfg.canvas, np.random.default_rng([self.cfg.noise_seed, r]))
        if self.cfg.image_format == "array":
            return x.copy()
        from ..optional import require

        Image = require("PIL.Image", "train")
        return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)).convert("RGB")

    def example(self, rows: range, fresh: bool, i: int) -> dict:
        r = rows[i]
        return {
            "inputs": {self.cfg.modality: self.image(r, fresh)},
            "target": int(self.arrays()[1][r]),
            "id": f"mnist/{r}",
        }

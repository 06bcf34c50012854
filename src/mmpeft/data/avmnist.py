"""`avmnist`: the AV-MNIST-style spoken + handwritten digit set of ``shared/data/avmnist``.

An FSDD recording (8 kHz) paired with an MNIST t10k image of the same digit, after MultiBench's
AV-MNIST (Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
Learning", NeurIPS 2021 Datasets and Benchmarks, arXiv 2107.07502) but a new set; its README and
``build.py`` are normative. ``avmnist.npz`` holds ``image`` uint8 (N, 28, 28), ``audio`` int16
(N, 8000), ``audio_length``, ``label``, ``split`` (train / val / test, speaker-held-out),
``noise_seed``, ``noise_sigma``, ``sample_rate`` (and provenance arrays).

The image input is ``image / 255 + sigma * noise`` with the fixed noise
``RandomState(noise_seed).standard_normal((N, 28, 28))`` (row i belongs to sample i; never
redrawn). Audio is ``int16 / 32768`` resampled to ``target_sampling_rate``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split, require_file, resample

REQUIRED = ("image", "audio", "audio_length", "label", "split", "sample_rate", "noise_seed", "noise_sigma")


@dataclass
class AVMNISTConfig(ReaderConfig):
    """``root`` is the folder holding ``avmnist.npz`` (or the .npz file itself)."""

    image_noise: bool = True
    """Add the set's fixed pixel noise (the benchmark's image input); False gives the clean image / 255."""
    image_format: Literal["array", "pil"] = "array"
    """``array``: float32 (28, 28), usable as a 28-step feature sequence; ``pil``: the noisy image
    clipped to [0, 1] as an 8-bit RGB PIL image, for image encoders."""
    audio_format: Literal["waveform", "frames"] = "waveform"
    """``waveform``: 1-D float32; ``frames``: (T, frame_length) non-overlapping frames (feature encoders)."""
    target_sampling_rate: int = 16000
    """Rate the audio is resampled to (Whisper and wav2vec2 expect 16000; 0 keeps 8000)."""
    frame_length: int = 400
    """Samples per frame when ``audio_format`` is ``frames`` (the tail that does not fill a frame is dropped)."""
    trim_audio: bool = False
    """Cut the zero padding: keep only the ``audio_length`` real samples of each clip."""
    image_modality: str = "image"
    """Modality name of the digit images."""
    audio_modality: str = "audio"
    """Modality name of the spoken digits."""


@register_dataset("avmnist")
class AVMNISTReader(DatasetReader):
    config_class = AVMNISTConfig

    def __init__(self, cfg: AVMNISTConfig):
        super().__init__(cfg)
        root = cfg.root
        self.path = os.path.join(root, "avmnist.npz") if os.path.isdir(root) else root
        if cfg.audio_format == "frames" and cfg.frame_length <= 0:
            raise DataError("avmnist: frame_length must be positive")
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def modalities(self) -> list[str]:
        return [self.cfg.image_modality, self.cfg.audio_modality]

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self.load()
        return self._arrays

    def load(self) -> dict[str, np.ndarray]:
        require_file(self.path, "avmnist")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.path}: cannot read the npz ({e})") from None
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise DataError(f"{self.path}: missing array(s) {missing}; it has {sorted(d)}")
        n = len(d["label"])
        shapes = {"image": 3, "audio": 2, "audio_length": 1, "label": 1, "split": 1}
        for key, ndim in shapes.items():
            if d[key].ndim != ndim or len(d[key]) != n:
                raise DataError(
                    f"{self.path}: {key!r} has shape {d[key].shape}, expected {ndim}-D with {n} rows"
                )
        if d["label"].dtype.kind not in "iu":
            raise DataError(f"{self.path}: 'label' has dtype {d['label'].dtype}, expected integers")
        bad = np.flatnonzero((d["label"] < 0) | (d["label"] > 9))
        if len(bad):
            raise DataError(
                f"{self.path}: row {int(bad[0])} has label {int(d['label'][bad[0]])}, not a digit 0-9"
            )
        bad = np.flatnonzero(~np.isin(d["split"], ("train", "val", "test")))
        if len(bad):
            raise DataError(f"{self.path}: row {int(bad[0])} has unknown split {d['split'][bad[0]]!r}")
        image = d["image"].astype(np.float32) / 255.0
        if self.cfg.image_noise:  # the fixed noise of build.py, regenerated (RandomState's stream is frozen)
            noise = np.random.RandomState(int(d["noise_seed"])).standard_normal(d["image"].shape)
            image = image + float(d["noise_sigma"]) * noise.astype(np.float32)
        d["input_image"] = image.astype(np.float32)  # (N, 28, 28)
        return d

    def info(self) -> dict[str, Any]:
        d = self.arrays()
        rate = self.cfg.target_sampling_rate or int(d["sample_rate"])
        return {
            "num_classes": 10,
            "label_names": [str(k) for k in range(10)],
            "sampling_rate": {self.cfg.audio_modality: rate},
        }

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        rows = np.flatnonzero(self.arrays()["split"] == split)
        return ExampleList(len(rows), partial(self.example, rows), f"avmnist[{split}]")

    def audio(self, r: int) -> np.ndarray:
        d = self.arrays()
        x = d["audio"][r].astype(np.float32) / 32768.0  # (8000,)
        if self.cfg.trim_audio:
            x = x[: max(int(d["audio_length"][r]), 1)]
        x = resample(x, int(d["sample_rate"]), self.cfg.target_sampling_rate)
        if self.cfg.audio_format == "frames":
            n = len(x) // self.cfg.frame_length
            if n == 0:
                raise DataError(f"{self.path}: row {r} has {len(x)} samples, fewer than one frame")
            x = x[: n * self.cfg.frame_length].reshape(n, self.cfg.frame_length)  # (T, frame_length)
        return x

    def image(self, r: int) -> Any:
        x = self.arrays()["input_image"][r]  # (28, 28)
        if self.cfg.image_format == "array":
            return x.copy()
        from ..optional import require

        Image = require("PIL.Image", "train")
        return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)).convert("RGB")

    def example(self, rows: np.ndarray, i: int) -> dict:
        d = self.arrays()
        r = int(rows[i])
        ident = str(d["fsdd_file"][r]) if "fsdd_file" in d else str(r)
        return {
            "inputs": {self.cfg.image_modality: self.image(r), self.cfg.audio_modality: self.audio(r)},
            "target": int(d["label"][r]),
            "id": ident,
        }

"""`cmu_mfn`: CMU YouTube / ICT-MMMO / POM feature sequences in the MFN ``.h5`` layout.

Format (Zadeh et al., "Memory Fusion Network for Multi-view Sequential Learning", AAAI 2018;
github.com/pliang279/MFN, ``new_data/{youtube,mmmo,pom}/``; ``shared/data/cmu_mfn/README.md``):
one folder per set holding ``{audio,video}_{train,valid,test}.h5``, ``text_{split}_emb.h5`` and
``y_{train,valid,test}.h5``, each an HDF5 file with one dataset ``d1``. Features are float
(N, 20, D) word-aligned steps (COVAREP audio, FACET video, GloVe text); a step of all zeros means
"no data" (MFN pads at the front, but empty steps also occur mid-sequence). Labels are YouTube's
(N, 3) one-hot sentiment classes, MMMO's (N,) score or POM's (N, 17) ratings.

Items are (T, F) float32 arrays, what the ``features`` encoder's ``collate`` accepts:

- ``normalize`` standardises each feature with the mean / std of the *train* split's non-empty
  steps (val and test never enter the statistics), a feature with std below 1e-6 keeps std 1,
  then clips to ``[-clip, clip]``; empty steps stay exactly zero.
- Non-finite values (NaN / inf) are replaced by 0 before anything else, so a step that is all
  NaN counts as empty. (The published files hold none; the rule guards re-exported copies.)
- ``drop_empty_steps`` keeps only the non-empty steps, in order, so the collate's attention mask
  marks the empty ones as padding; an all-empty sequence keeps its last step (zeros) so that
  every example has at least one step.

Targets: a one-hot label file gives the class id (argmax; the columns' meanings are not
documented upstream, so the classes are named ``0``/``1``/``2``); otherwise ``target`` picks the
label column(s) as a float or a list of floats. Ids are ``<set>/<split>/<row>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split, require_file

FEATURE_FILES = {"audio": "audio_{split}.h5", "video": "video_{split}.h5", "text": "text_{split}_emb.h5"}
FILE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
MIN_STD = 1e-6


@dataclass
class CMUMFNConfig(ReaderConfig):
    """``root`` is one set's folder, e.g. ``shared/data/cmu_mfn/mmmo``."""

    modalities: list[str] = field(default_factory=lambda: ["audio", "video"])
    """Feature files to read, also the modality names: ``audio``, ``video`` and ``text``. The
    published data has text only for valid / test (and none for POM): a split without its text
    file, or ``normalize`` without ``text_train_emb.h5``, is a DataError naming the file."""
    target: int | list[int] = 0
    """Label column(s) of a non-one-hot label file: an int gives a float target (POM column 0, as
    earlier baselines used; MMMO's (N,) scores are column 0), a list a list of floats
    (``num_targets`` = its length). Ignored for a one-hot file (YouTube), whose target is the class id."""
    normalize: bool = True
    """Standardise each feature with the train split's mean / std over its non-empty steps."""
    clip: float = 10.0
    """After ``normalize``, clip values to [-clip, clip] (0: no clipping). The raw COVAREP features
    reach +-255 and standardise to about +-65 on MMMO; nothing is clipped without ``normalize``."""
    drop_empty_steps: bool = True
    """Keep only the non-empty (not all-zero) steps, so batches mask the empty ones as padding;
    False keeps all steps, empty ones as zero vectors that the encoder attends to (MFN's input)."""


def read_d1(path: str) -> np.ndarray:
    """The ``d1`` dataset of an MFN ``.h5`` file; a missing or unreadable file is a DataError."""
    from ..optional import require

    h5py = require("h5py", "train")
    require_file(path, "cmu_mfn")
    try:
        with h5py.File(path, "r") as f:
            if "d1" not in f:
                raise DataError(f"{path}: no dataset 'd1'; the file has {sorted(f.keys())}")
            return np.asarray(f["d1"][()])
    except OSError as e:
        raise DataError(f"{path}: cannot read the HDF5 file ({e})") from None


def empty_steps(x: np.ndarray) -> np.ndarray:
    """(N, T, F) features -> (N, T) True where a step is all zeros ("no data")."""
    return ~np.any(x != 0, axis=-1)


def fit_stats(x: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (F,) over the non-empty steps; a near-constant feature gets std 1."""
    steps = x[~empty].astype(np.float64)  # (n_steps, F)
    if len(steps) == 0:
        return np.zeros(x.shape[-1]), np.ones(x.shape[-1])
    mean, std = steps.mean(axis=0), steps.std(axis=0)
    return mean, np.where(std < MIN_STD, 1.0, std)


def standardize(
    x: np.ndarray, empty: np.ndarray, mean: np.ndarray, std: np.ndarray, clip: float
) -> np.ndarray:
    """(x - mean) / std clipped to +-clip (0: unclipped) on non-empty steps; empty steps stay zero."""
    z = (x - mean) / std
    if clip > 0:
        z = np.clip(z, -clip, clip)
    return np.where(empty[..., None], 0.0, z)


def is_one_hot(y: np.ndarray) -> bool:
    """Every row of a 2-D label array is 0 except for a single 1."""
    return y.ndim == 2 and y.shape[1] > 1 and bool(np.isin(y, (0, 1)).all()) and bool((y.sum(1) == 1).all())


@register_dataset("cmu_mfn")
class CMUMFNReader(DatasetReader):
    config_class = CMUMFNConfig

    def __init__(self, cfg: CMUMFNConfig):
        super().__init__(cfg)
        unknown = [m for m in cfg.modalities if m not in FEATURE_FILES]
        if not cfg.modalities or unknown or len(set(cfg.modalities)) != len(cfg.modalities):
            raise DataError(
                f"cmu_mfn: modalities {cfg.modalities!r} must be distinct names among {list(FEATURE_FILES)}"
            )
        columns = cfg.target if isinstance(cfg.target, list) else [cfg.target]
        if not columns or min(columns) < 0:
            raise DataError(
                f"cmu_mfn: target {cfg.target!r} must be a column index or a non-empty list of them"
            )
        self.columns = columns
        self.set_name = os.path.basename(os.path.normpath(cfg.root))
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._parts: dict[str, dict[str, Any]] = {}
        self._kind: str | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.modalities)

    def path(self, stem: str, split: str) -> str:
        """File of modality ``stem`` (or ``y`` for labels) for a canonical split."""
        name = FEATURE_FILES.get(stem, "y_{split}.h5").format(split=FILE_SPLITS[split])
        return os.path.join(self.cfg.root, name)

    def raw_features(self, modality: str, split: str, purpose: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(N, T, F) float64 features with non-finite values zeroed, and their (N, T) empty-step mask."""
        path = self.path(modality, split)
        if not os.path.isfile(path):
            raise DataError(f"cmu_mfn: modality {modality!r} has no {split} file {path!r}{purpose}")
        x = read_d1(path)
        if x.ndim != 3 or x.dtype.kind not in "fiu":
            raise DataError(f"{path}: 'd1' has shape {x.shape} ({x.dtype}), expected numeric (N, T, F)")
        x = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
        return x, empty_steps(x)

    def stats(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """The (F,) mean and std fitted on the train split's non-empty steps."""
        if modality not in self._stats:
            self._stats[modality] = fit_stats(
                *self.raw_features(modality, "train", " (normalize fits its statistics on train)")
            )
        return self._stats[modality]

    def features(self, modality: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready (N, T, F) float32 features of one split and their (N, T) empty-step mask."""
        x, empty = self.raw_features(modality, split)
        if self.cfg.normalize:
            mean, std = self.stats(modality)
            if x.shape[-1] != len(mean):
                raise DataError(
                    f"{self.path(modality, split)}: {x.shape[-1]} features per step, but the train "
                    f"file {self.path(modality, 'train')!r} has {len(mean)}"
                )
            x = standardize(x, empty, mean, std, self.cfg.clip)
        return x.astype(np.float32), empty

    def label_kind(self) -> str:
        """``class`` when the train labels are one-hot rows, else ``value``."""
        if self._kind is None:
            self._kind = "class" if is_one_hot(self.labels("train")) else "value"
        return self._kind

    def labels(self, split: str) -> np.ndarray:
        """The label file of a split as (N,) or (N, K) float64; non-finite labels are a DataError."""
        path = self.path("y", split)
        y = read_d1(path)
        if y.ndim not in (1, 2) or y.dtype.kind not in "fiu":
            raise DataError(f"{path}: 'd1' has shape {y.shape} ({y.dtype}), expected numeric (N,) or (N, K)")
        y = y.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))
        if len(bad):
            raise DataError(f"{path}: row {int(bad[0])} has a missing (non-finite) label")
        return y

    def targets(self, split: str) -> list:
        """Per-row targets: class ids for one-hot labels, else the ``target`` column(s)."""
        y, path = self.labels(split), self.path("y", split)
        if self.label_kind() == "class":
            if not is_one_hot(y):
                raise DataError(
                    f"{path}: labels of shape {y.shape} are not one-hot rows like the train labels"
                )
            return [int(k) for k in y.argmax(axis=1)]
        y = y.reshape(len(y), -1)  # MMMO's (N,) scores are one column
        if max(self.columns) >= y.shape[1]:
            raise DataError(
                f"{path}: target column(s) {self.cfg.target!r} out of range for {y.shape[1]} column(s)"
            )
        picked = y[:, self.columns]
        return picked.tolist() if isinstance(self.cfg.target, list) else picked[:, 0].tolist()

    def part(self, split: str) -> dict[str, Any]:
        """One split's targets and features, read and checked once."""
        if split not in self._parts:
            targets = self.targets(split)
            part: dict[str, Any] = {"targets": targets, "features": {}}
            for m in self.cfg.modalities:
                x, empty = self.features(m, split)
                if len(x) != len(targets):
                    raise DataError(
                        f"{self.path(m, split)}: {len(x)} rows, but the label file "
                        f"{self.path('y', split)!r} has {len(targets)}"
                    )
                part["features"][m] = (x, empty)
            self._parts[split] = part
        return self._parts[split]

    def info(self) -> dict[str, Any]:
        dims = {m: int(x.shape[-1]) for m, (x, _) in self.part("train")["features"].items()}
        if self.label_kind() == "class":
            k = len(self.labels("train")[0])
            return {"num_classes": k, "label_names": [str(c) for c in range(k)], "feature_dims": dims}
        return {"num_targets": len(self.columns), "feature_dims": dims}

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        n = len(self.part(split)["targets"])
        return ExampleList(n, partial(self.example, split), f"cmu_mfn[{self.set_name}/{split}]")

    def item(self, x: np.ndarray, empty: np.ndarray) -> np.ndarray:
        """One example's (T, F) input: all steps, or only the non-empty ones (at least the last)."""
        if not self.cfg.drop_empty_steps:
            return x.copy()
        keep = ~empty
        return x[keep] if keep.any() else x[-1:].copy()

    def example(self, split: str, i: int) -> dict:
        part = self.part(split)
        inputs = {m: self.item(x[i], empty[i]) for m, (x, empty) in part["features"].items()}
        return {"inputs": inputs, "target": part["targets"][i], "id": f"{self.set_name}/{split}/{i}"}

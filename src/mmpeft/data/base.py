"""The dataset-reader interface (DESIGN §4) and the helpers readers share.

A reader is a registered class built from its config dataclass. ``split(name)`` returns a
map-style ``torch.utils.data.Dataset`` whose items are examples::

    {"inputs": {modality: raw item}, "target": label / value / answer index, "id": str}

Raw items are what the encoders' ``collate`` accepts: a string (text), a PIL image or image
path, a 1-D waveform array with ``sampling_rate`` known to the reader, or a (T, F) feature
array. Retrieval examples carry ``"id"`` = the item id that defines positives (an image id
shared by its captions). Bad data raises ``DataError`` naming the file and row.

Split names are ``train``, ``val`` and ``test``; ``valid``, ``dev`` and ``validation`` are
accepted as aliases of ``val``. Shared helpers below read JSONL/CSV tables, WAV audio and
images, resample audio, and unpickle numpy-only pickles without running code from the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import wave
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data problem; the message names the file and the row."""


@dataclass
class ReaderConfig:
    root: str = ""
    """Directory (or file) holding the dataset in its published format."""


class DatasetReader:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[ReaderConfig]] = ReaderConfig
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    augments: ClassVar[bool] = False
    """Inputs change from epoch to epoch (random augmentation): prefix caching is refused."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg

    @property
    def modalities(self) -> list[str]:
        """Modality names of ``inputs`` (they must match the model's encoders)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Facts a task needs, e.g. ``{"num_classes": 10}`` or ``{"label_names": [...]}``."""
        return {}

    def split(self, name: str) -> Dataset:
        raise NotImplementedError

    def check_files(self) -> None:
        """Check every split's files quickly (present, headers readable) before training starts.

        A reader whose items are files on disk overrides this, so a bad file in the test split
        is reported before the first step rather than after the last one."""


def lacks(example: dict, modality: str) -> bool:
    """The example has no input for ``modality`` (None, not given) or is marked as lacking it
    (``example["absent"]``, e.g. by ``mmpeft eval --missing``, which keeps the input as a stand-in)."""
    return example["inputs"].get(modality) is None or modality in example.get("absent", ())


class StandIns:
    """A present input per modality from a split, for batches in which no example has one."""

    def __init__(self, dataset):
        self.dataset, self.found = dataset, {}

    def __call__(self, modality: str) -> Any:
        if modality not in self.found:
            for i in range(len(self.dataset)):
                item = self.dataset[i]["inputs"].get(modality)
                if item is not None:
                    self.found[modality] = item
                    break
            else:
                raise DataError(
                    f"no example of this split has a {modality!r} input; nothing can stand in for it"
                )
        return self.found[modality]


def collate_examples(examples: list[dict], encoders: dict, stand_in=None) -> dict[str, Any]:
    """Examples -> {"inputs": {m: encoder batch}, "targets", "ids"[, "absent"]} via each encoder's collate.

    An example may lack any modality but one (``mmpeft.missing``): its slot gets a stand-in input
    (another example's, else ``stand_in(modality)``) that the model overwrites, and
    ``absent[m]`` (B,) bool marks it."""
    inputs, absent = {}, {}
    marks = {m: [lacks(ex, m) for ex in examples] for m in encoders}
    for j, ex in enumerate(examples):
        if all(marks[m][j] for m in encoders):
            raise DataError(
                f"example {ex.get('id')!r} has none of the model's modalities {list(encoders)}; "
                f"it has {sorted(k for k, v in ex['inputs'].items() if v is not None)}"
            )
    for m, enc in encoders.items():
        items = [ex["inputs"].get(m) for ex in examples]
        if any(marks[m]):
            present = [x for x in items if x is not None]
            if not present and stand_in is None:
                raise DataError(
                    f"no example of the batch has a {m!r} input (ids {[ex.get('id') for ex in examples][:5]})"
                )
            fill = present[0] if present else stand_in(m)
            items = [fill if x is None else x for x in items]
            absent[m] = torch.tensor(marks[m], dtype=torch.bool)
        inputs[m] = enc.collate(items)
    batch = {
        "inputs": inputs,
        "targets": [ex.get("target") for ex in examples],
        "ids": [ex.get("id") for ex in examples],
    }
    if absent:
        batch["absent"] = absent
    return batch


def build_reader(name: str, options: dict | None = None, where: str = "data") -> DatasetReader:
    """Registered reader ``name`` built from a plain options dict (validated: unknown keys are errors)."""
    from ..config import ConfigError, from_dict
    from ..registry import DATASETS

    try:
        cls = DATASETS.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    return cls(from_dict(cls.config_class, options, where=f"{where} ({name})"))


# --- splits and map-style datasets ------------------------------------------------------------
SPLIT_ALIASES = {"valid": "val", "validation": "val", "dev": "val"}


def canonical_split(name: str, available: tuple[str, ...] | list[str], reader: str) -> str:
    """``valid``/``dev`` -> ``val``; an unknown split is an error listing the available ones."""
    split = SPLIT_ALIASES.get(name, name)
    if split not in available:
        raise DataError(f"dataset {reader!r} has no split {name!r}; available: {list(available)}")
    return split


class ExampleList(Dataset):
    """Map-style dataset of ``n`` examples, each built on access by ``make(i)``."""

    def __init__(self, n: int, make: Callable[[int], dict], name: str = ""):
        self.n = n
        self.make = make
        self.name = name

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.name}: index {i} out of range for {self.n} examples")
        return self.make(i % self.n)


def resolve_path(path: str, base: str) -> str:
    """A path from a data file: absolute, ``~``-expanded, or relative to ``base``."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base, path)


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{what}: file {path!r} not found")
    return path


# --- tables ------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; bad JSON or a non-object is a DataError."""
    require_file(path, "jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}"
                )
            rows.append((line_no, record))
    return rows


def read_csv(path: str, delimiter: str | None = None) -> list[tuple[int, dict]]:
    """(line number, row dict) of a CSV/TSV file with a header; TSV when the name ends in .tsv."""
    require_file(path, "csv")
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file, expected a header row")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(
                    f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} columns "
                    f"{reader.fieldnames}, got a different number"
                )
            rows.append((reader.line_num, row))
    return rows


# --- images and audio --------------------------------------------------------------------------
def open_image(path: str, where: str, decode: bool = True):
    """Open and decode an image as RGB PIL; a missing or corrupt file is a DataError naming ``where``.

    ``decode=False`` only checks it (header and, for PNG, chunk checksums; no pixels) and returns None."""
    from ..optional import require

    Image = require("PIL.Image", "train")
    if not os.path.isfile(path):
        raise DataError(f"{where}: image file {path!r} not found")
    try:
        with Image.open(path) as im:
            if not decode:
                im.verify()
                return None
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image {path!r} ({e})") from None


def check_image(path: str, where: str) -> None:
    open_image(path, where, decode=False)


def check_wav(path: str, where: str) -> None:
    """The WAV file exists and its header reads, without reading the samples."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: audio file {path!r} not found")
    try:
        with wave.open(path, "rb") as w:
            w.getnframes()
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{where}: cannot read WAV {path!r} ({e})") from None


def read_wav(path: str, where: str) -> tuple[np.ndarray, int]:
    """PCM WAV -> (mono float32 waveform in [-1, 1], sampling rate); channels are averaged."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: audio file {path!r} not found")
    try:
        with wave.open(path, "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{where}: cannot read WAV {path!r} ({e})") from None
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:  # 24-bit: little-endian triplets, sign from the top byte
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
        raise DataError(f"{where}: WAV {path!r} has unsupported sample width {width} bytes")
    if len(x) % channels:
        raise DataError(f"{where}: WAV {path!r} is truncated")
    x = x.reshape(-1, channels).mean(axis=1)  # (n,)
    return np.ascontiguousarray(x, dtype=np.float32), rate


def resample(x: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling of a 1-D waveform; ``target_rate`` 0 or equal keeps it."""
    if not target_rate or orig_rate == target_rate:
        return np.asarray(x, dtype=np.float32)
    from ..optional import require

    signal = require("scipy.signal", "train")
    g = math.gcd(int(orig_rate), int(target_rate))
    y = signal.resample_poly(np.asarray(x, dtype=np.float64), int(target_rate) // g, int(orig_rate) // g)
    return y.astype(np.float32)


# --- numpy-only pickles ------------------------------------------------------------------------
# (module, name) -> the only globals a pickle may reference: numpy array/dtype/scalar
# reconstruction (numpy 1 names "numpy.core", numpy 2 "numpy._core") and builtin containers.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("_codecs", "encode"),  # protocol 2 stores bytes as _codecs.encode(str, "latin1")
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays from Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self.path}: refusing to unpickle {module}.{name}; only numpy arrays and builtin "
                "containers are allowed (the file may be crafted to run code)"
            )
        if module.startswith("numpy.") or module.startswith("numpy._"):
            core = getattr(np, "_core", None) or np.core
            return getattr(getattr(core, module.rsplit(".", 1)[1]), name)
        if module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def load_numpy_pickle(path: str) -> Any:
    """Unpickle a file that may hold only numpy arrays, dtypes, scalars and builtin containers.

    Any other global (``os.system``, ``builtins.eval``, a class) raises ``DataError`` before it
    is called, so a crafted pickle cannot run code.
    """
    require_file(path, "pickle")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or malformed stream
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None

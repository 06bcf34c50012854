"""`manifest`: bring your own data without code, from a JSONL or CSV/TSV table.

Each row is one example. ``columns`` maps modality -> column; a cell names a file relative to
``base_dir`` (an image, a PCM ``.wav`` or a ``.npy`` feature array) or holds an inline value
(text, a number, or in JSONL a list of numbers). The kind of each modality is inferred from the
file extension or the value, or set in ``kinds``. One table with a ``split`` column, or one file
per split (``files``). Labels: class names or indices (``class``), lists of labels
(``multilabel``; in CSV joined by ``|``) or numbers (``float``, regression).

Items: images are RGB PIL images opened on access (or their paths), audio a 1-D float32
waveform at ``target_sampling_rate``, arrays (T, F) float32, text a string. A missing or corrupt
file, a wrong shape or a missing label is a ``DataError`` naming the file, the line and the
column.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from ..registry import register_dataset
from .base import (
    DataError,
    DatasetReader,
    ExampleList,
    ReaderConfig,
    canonical_split,
    check_image,
    check_wav,
    open_image,
    read_csv,
    read_jsonl,
    read_wav,
    require_file,
    resample,
    resolve_path,
)

log = logging.getLogger("mmpeft")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
KINDS = ("auto", "image", "audio", "array", "text", "value")


@dataclass
class ManifestConfig(ReaderConfig):
    """``root`` is the table (.jsonl, .csv, .tsv), or the folder of the per-split ``files``."""

    columns: dict = field(default_factory=dict)
    """Modality -> column holding its file path or inline value (required)."""
    kinds: dict = field(default_factory=dict)
    """Modality -> ``image``, ``audio``, ``array`` (.npy), ``text`` or ``value``; missing: inferred from
    the extension, else text (a CSV cell is always a string: set ``value`` for inline numbers)."""
    files: dict | None = None
    """Split -> table file relative to ``root`` (None: ``root`` is one table with ``split_column``)."""
    split_column: str = "split"
    """Column naming each row's split (train / val / test; valid and dev mean val)."""
    label_column: str = "label"
    """Column holding the target."""
    label_type: Literal["class", "multilabel", "float"] = "class"
    """Target kind: a class name or index, a list of class names, or one or more numbers."""
    label_names: list[str] | None = None
    """Class names in index order (None: the sorted distinct names over all rows)."""
    multilabel_sep: str = "|"
    """Separator of the labels of one CSV cell when ``label_type`` is ``multilabel``."""
    id_column: str = ""
    """Column holding the example id ("": ``<file>:<line>``)."""
    base_dir: str = ""
    """Directory that relative file paths start from (default: the table's folder)."""
    target_sampling_rate: int = 16000
    """Rate audio is resampled to (0 keeps each file's own rate)."""
    feature_dims: dict = field(default_factory=dict)
    """Modality -> required last dimension F of its (T, F) arrays or values (checked on access)."""
    load_images: bool = True
    """Open images on access (RGB PIL); False yields their paths (checked to exist)."""


def empty(value: Any) -> bool:
    """An empty cell (``""`` in CSV, null or absent in JSONL): the example lacks that modality."""
    return value is None or (isinstance(value, str) and not value.strip())


def infer_kind(value: Any) -> str:
    if isinstance(value, str):
        ext = os.path.splitext(value.lower())[1]
        if ext in IMAGE_EXTS:
            return "image"
        return {".wav": "audio", ".npy": "array"}.get(ext, "text")
    return "value"


@register_dataset("manifest")
class ManifestReader(DatasetReader):
    config_class = ManifestConfig

    def __init__(self, cfg: ManifestConfig):
        super().__init__(cfg)
        if not cfg.columns:
            raise DataError("manifest: 'columns' must map at least one modality to a column")
        for m, kind in cfg.kinds.items():
            if m not in cfg.columns or kind not in KINDS:
                raise DataError(
                    f"manifest: kinds[{m!r}] = {kind!r}; modalities {list(cfg.columns)}, kinds {KINDS}"
                )
        if cfg.files is not None:
            self.splits = tuple(canonical_split(s, ("train", "val", "test"), self.name) for s in cfg.files)
        self._rows: dict[str, list[tuple[str, int, dict]]] | None = None
        self._names: list[str] | None = list(cfg.label_names) if cfg.label_names is not None else None
        self._counts: Counter | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.columns)

    # --- the table -----------------------------------------------------------------------------
    def table(self, path: str) -> list[tuple[int, dict]]:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json"):
            return read_jsonl(path)
        if ext in (".csv", ".tsv"):
            return read_csv(path)
        raise DataError(f"manifest: {path!r} is not .jsonl, .csv or .tsv")

    def rows(self) -> dict[str, list[tuple[str, int, dict]]]:
        """split -> [(table path, line, row)], with every needed cell checked to be present."""
        if self._rows is not None:
            return self._rows
        out: dict[str, list] = {s: [] for s in self.splits}
        if self.cfg.files is None:
            path = require_file(self.cfg.root, "manifest")
            for line, row in self.table(path):
                raw = self.cell(row, self.cfg.split_column, path, line, "split")
                split = {"valid": "val", "dev": "val", "validation": "val"}.get(str(raw), str(raw))
                if split not in out:
                    raise DataError(
                        f"{path}, line {line}: unknown split {raw!r}; expected {list(self.splits)}"
                    )
                out[split].append((path, line, row))
        else:
            for split, name in self.cfg.files.items():
                path = resolve_path(name, self.cfg.root)
                out[canonical_split(split, self.splits, self.name)] = [
                    (path, ln, r) for ln, r in self.table(path)
                ]
        for split, rows in out.items():
            cols = self.cfg.columns
            never = [
                f"{m!r} (column {c!r})"
                for m, c in cols.items()
                if rows and all(empty(r.get(c)) for *_, r in rows)
            ]
            if never:  # more likely a misspelt column than a modality that no example has
                raise DataError(f"manifest split {split!r}: {', '.join(never)} is empty in every row")
            for path, line, row in rows:
                if all(empty(row.get(c)) for c in cols.values()):
                    raise DataError(
                        f"{path}, line {line}: every input column {list(cols.values())} is empty; nothing to use"
                    )
                self.cell(row, self.cfg.label_column, path, line, "label")
        self._rows = out
        return out

    @staticmethod
    def cell(row: dict, col: str, path: str, line: int, what: str) -> Any:
        value = row.get(col)
        if value is None or value == "":
            raise DataError(f"{path}, line {line}: missing {what} (column {col!r})")
        return value

    # --- labels --------------------------------------------------------------------------------
    def label_items(self, value: Any) -> list:
        if self.cfg.label_type == "multilabel":
            return value if isinstance(value, list) else str(value).split(self.cfg.multilabel_sep)
        return [value]

    def label_counts(self) -> Counter:
        """Label -> count over the rows that define the class set: the train split where there is one."""
        if self._counts is None:
            rows = self.rows()
            source = rows.get("train") or [r for v in rows.values() for r in v]
            labels = (x for _, _, row in source for x in self.label_items(row[self.cfg.label_column]))
            self._counts = Counter(str(x) for x in labels)
        return self._counts

    def counts_text(self) -> str:
        counts = self.label_counts()
        order = sorted(counts, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
        return ", ".join(f"{x!r}: {counts[x]}" for x in order)

    def names(self) -> list[str] | None:
        """Class names: declared, or inferred from the train split's labels when they are not indices."""
        if self._names is None and self.cfg.label_type != "float":
            found = self.label_counts()
            if found and not all(self.index_like(x) for x in found):
                self._names = sorted(found)
        return self._names

    @staticmethod
    def index_like(x: Any) -> bool:
        return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x.isdigit())

    def target(self, value: Any, path: str, line: int) -> Any:
        where = f"{path}, line {line}, column {self.cfg.label_column!r}"
        if self.cfg.label_type == "float":
            try:
                x = np.asarray(json.loads(value) if isinstance(value, str) else value, dtype=np.float64)
            except (ValueError, TypeError):
                raise DataError(f"{where}: label {value!r} is not a number or list of numbers") from None
            if not np.isfinite(x).all():
                raise DataError(f"{where}: label {value!r} is not finite")
            return float(x) if x.ndim == 0 else x.reshape(-1).tolist()
        names = self.names()
        index = {n: k for k, n in enumerate(names)} if names is not None else {}
        out = []
        for x in self.label_items(value):
            if str(x) in index:
                out.append(index[str(x)])
            elif names is None and self.index_like(x) and int(x) < self.num_classes():
                out.append(int(x))
            else:
                origin = "declared in label_names" if self.cfg.label_names is not None else (
                    f"inferred from the train split: {self.counts_text()}")  # fmt: skip
                raise DataError(f"{where}: unknown label {x!r}; the classes are {origin}")
        if self.cfg.label_type == "class":
            return out[0]
        return [1.0 if k in out else 0.0 for k in range(self.num_classes())]

    def num_classes(self) -> int:
        names = self.names()
        if names is not None:
            return len(names)
        found = {int(x) for x in self.label_counts()}
        n = 1 + max(found)
        if len(found) < n:  # 0/1 data with a stray 7 would silently get an 8-way head
            unseen = sorted(set(range(n)) - found)
            raise DataError(
                f"manifest {self.cfg.root!r}: class indices inferred from the train split skip {unseen} "
                f"(labels {self.counts_text()}); fix the stray label, or declare every class in "
                "data.label_names"
            )
        return n

    def check_labels(self) -> None:
        """Every row's label parses and belongs to the class set (before any training)."""
        for rows in self.rows().values():
            for path, line, row in rows:
                self.target(row[self.cfg.label_column], path, line)

    def info(self) -> dict[str, Any]:
        rows = [r for v in self.rows().values() for r in v]
        if not rows:
            raise DataError(f"manifest {self.cfg.root!r} has no rows")
        path, line, row = rows[0]
        rate = self.cfg.target_sampling_rate or None  # None: each file keeps its own rate

        def first_value(col: str) -> Any:
            return next((r[col] for _, _, r in rows if not empty(r.get(col))), None)

        audio = [m for m, col in self.cfg.columns.items() if self.kind(m, first_value(col)) == "audio"]
        out: dict[str, Any] = {"sampling_rate": {m: rate for m in audio}}
        if self.cfg.label_type == "float":
            first = self.target(row[self.cfg.label_column], path, line)
            out["num_targets"] = len(first) if isinstance(first, list) else 1
        else:
            n = self.num_classes()
            self.check_labels()
            if self.cfg.label_names is None:
                log.info("manifest: %d classes from the train split's labels (%s)", n, self.counts_text())
                counts = self.label_counts()
                plenty = sum(counts.values()) >= 20 * len(counts)  # a single example stands out
                rare = [x for x, c in counts.items() if c == 1] if plenty else []
                if rare:
                    log.warning("manifest: label(s) %s occur once in the train split; typos? (labels %s)",
                                rare, self.counts_text())  # fmt: skip
            out["num_labels" if self.cfg.label_type == "multilabel" else "num_classes"] = n
            out["label_names"] = self.names() or [str(k) for k in range(n)]
        return out

    # --- examples ------------------------------------------------------------------------------
    def kind(self, modality: str, value: Any) -> str:
        kind = self.cfg.kinds.get(modality, "auto")
        return infer_kind(value) if kind == "auto" and value is not None else kind

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        rows = self.rows()[split]
        if not rows:
            raise DataError(f"manifest {self.cfg.root!r} has no rows in split {split!r}")
        return ExampleList(len(rows), partial(self.example, split), f"manifest[{split}]")

    def example(self, split: str, i: int) -> dict:
        path, line, row = self.rows()[split][i]
        inputs = {  # an empty cell: the example lacks that modality (mmpeft.missing)
            m: None if empty(row.get(col)) else self.load(m, row[col], path, line, col)
            for m, col in self.cfg.columns.items()
        }
        ident = str(row[self.cfg.id_column]) if self.cfg.id_column else f"{os.path.basename(path)}:{line}"
        return {"inputs": inputs, "target": self.target(row[self.cfg.label_column], path, line), "id": ident}

    def check_files(self) -> None:
        """Every cell of every split: files present with readable headers, inline values parse."""
        for rows in self.rows().values():
            for path, line, row in rows:
                for m, col in self.cfg.columns.items():
                    if not empty(row.get(col)):
                        self.check_cell(m, row[col], path, line, col)

    def check_cell(self, modality: str, value: Any, path: str, line: int, col: str) -> None:
        where = f"{path}, line {line}, column {col!r}"
        kind = self.kind(modality, value)
        file = resolve_path(value, self.cfg.base_dir or os.path.dirname(os.path.abspath(path)))
        if kind == "image":
            check_image(file, where)
        elif kind == "audio":
            if not file.lower().endswith(".wav"):
                raise DataError(f"{where}: {file!r}: only PCM .wav audio is supported; convert it first")
            check_wav(file, where)
        elif kind == "array":
            try:
                x = np.load(require_file(file, where), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: cannot read array {file!r} ({e})") from None
            self.array_shape(modality, x.shape, where)  # values are checked when read
        elif kind == "value":
            self.load(modality, value, path, line, col)

    def load(self, modality: str, value: Any, path: str, line: int, col: str) -> Any:
        where = f"{path}, line {line}, column {col!r}"
        kind = self.kind(modality, value)
        base = self.cfg.base_dir or os.path.dirname(os.path.abspath(path))
        if kind == "text":
            return str(value)
        if kind == "image":
            file = resolve_path(value, base)
            return open_image(file, where) if self.cfg.load_images else require_file(file, where)
        if kind == "audio":
            file = resolve_path(value, base)
            if not file.lower().endswith(".wav"):
                raise DataError(f"{where}: {file!r}: only PCM .wav audio is supported; convert it first")
            wave, rate = read_wav(file, where)
            return resample(wave, rate, self.cfg.target_sampling_rate)
        if kind == "array":
            file = require_file(resolve_path(value, base), where)
            try:
                x = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: cannot read array {file!r} ({e})") from None
        else:  # inline value
            try:
                x = np.asarray(json.loads(value) if isinstance(value, str) else value, dtype=np.float32)
            except (ValueError, TypeError):
                raise DataError(f"{where}: {value!r} is not a number or a list of numbers") from None
        return self.check_array(modality, x, where)

    def array_shape(self, modality: str, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """The (T,) or (T, F) shape an array of ``shape`` is read as; a wrong one is a DataError."""
        shape = shape or (1,)
        want = self.cfg.feature_dims.get(modality)
        if len(shape) == 1 and want and want > 1 and shape[0] == want:
            shape = (1, want)  # one feature vector: a sequence of one step
        width = shape[-1] if len(shape) == 2 else 1
        if len(shape) not in (1, 2) or (want and width != want):
            expected = f"(T, {want})" if want else "(T,) or (T, F)"
            raise DataError(f"{where}: {modality!r} array has shape {shape}, expected {expected}")
        return shape

    def check_array(self, modality: str, x: np.ndarray, where: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape(self.array_shape(modality, x.shape, where))
        if not np.isfinite(x).all():
            raise DataError(f"{where}: {modality!r} array has non-finite values")
        return x

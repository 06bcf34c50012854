"""The on-disk prefix cache (DESIGN §5): frozen states stored once per distinct input, shared by runs.

Before the first trainable step every modality runs alone (methods that mix modalities are
trainable, so they act at or after that step). The states of one modality at step ``s`` are then
a pure function of (encoder weights, the encoder's preprocessing, the raw input, ``s``). A
``FeatureStore`` is one folder per (encoder fingerprint, number of blocks run); inside it, each
item's states are filed under the hash of its raw input. So:

- an image with five captions is computed once, and so is an item that two splits share;
- every run, every method of ``mmpeft bench`` and every trial of ``mmpeft tune`` whose frozen
  prefix ends at the same block reuses the same rows; a changed checkpoint, preprocessing option
  or data file changes a hash and is computed afresh, never served stale.

Layout: ``<root>/<fingerprint>/meta.json`` plus ``shard-*.safetensors`` files, each written
atomically (temporary file, fsync, rename) and never modified, so a killed build loses at most
the shard it was writing and concurrent writers cannot corrupt each other.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..checkpoint import atomic_write_bytes

FORMAT = 1  # bump when the stored layout or the meaning of a fingerprint changes
ENV_VAR = "MMPEFT_CACHE_DIR"


def default_cache_root() -> str:
    """``$MMPEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmpeft/prefix`` (``~/.cache/mmpeft/prefix``)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmpeft", "prefix")


def cache_root(cache_dir: str | None) -> str:
    """``train.cache_dir`` resolved: None means the default root, "" keeps states in memory."""
    return default_cache_root() if cache_dir is None else cache_dir


# --- fingerprints ---------------------------------------------------------------------------------
def _feed(h: Any, item: Any) -> None:
    """Feed a raw input (text, path, image, array, tensor, containers of them) into hash ``h``."""
    if isinstance(item, str):
        h.update(b"s" + item.encode())
        if len(item) < 4096 and os.path.isfile(item):  # a path: its bytes, not only its name
            with open(item, "rb") as f:
                h.update(b"f" + hashlib.blake2b(f.read(), digest_size=16).digest())
    elif isinstance(item, (bool, int, float)) or item is None:
        h.update(b"n" + repr(item).encode())
    elif isinstance(item, Tensor):
        _feed(h, item.detach().cpu().numpy())
    elif isinstance(item, np.ndarray):
        h.update(f"a{item.dtype.str}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, dict):
        h.update(b"d")
        for k in sorted(item, key=str):
            _feed(h, str(k))
            _feed(h, item[k])
    elif isinstance(item, (list, tuple)):
        h.update(f"l{len(item)}".encode())
        for v in item:
            _feed(h, v)
    elif hasattr(item, "tobytes") and hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
        h.update(f"i{item.mode}{item.size}".encode())
        h.update(item.tobytes())
    else:
        raise TypeError(f"cannot fingerprint an input of type {type(item).__name__}")


def content_hash(item: Any) -> str:
    """A 32-hex-digit hash of a raw input; equal inputs hash equally across processes and runs."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, item)
    return h.hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``module`` (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_fingerprint(encoder: torch.nn.Module, spec: dict, blocks: int, precision: str) -> dict:
    """What the stored states of one encoder depend on (besides the input itself)."""
    return {
        "format": FORMAT,
        "family": type(encoder).__qualname__,
        "spec": {k: spec.get(k) for k in ("type", "path", "config", "options")},
        "weights": weights_hash(encoder),
        "blocks": blocks,
        "precision": precision,
    }


# --- the store --------------------------------------------------------------------------------------
class FeatureStore:
    """States of one encoder after ``blocks`` blocks, filed by input hash."""

    def __init__(self, root: str, fingerprint: dict):
        digest = hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=12)
        self.folder = os.path.join(root, digest.hexdigest())
        self.fingerprint = fingerprint
        self.earlier: list[tuple[int, FeatureStore]] = []  # (blocks, store): same encoder, fewer blocks
        self._where: dict[str, str] = {}  # input hash -> shard file
        self._scanned: set[str] = set()

    def _scan(self) -> None:
        for path in sorted(glob.glob(os.path.join(self.folder, "shard-*.safetensors"))):
            if path in self._scanned:
                continue
            self._scanned.add(path)
            try:
                with safe_open(path, framework="pt") as f:
                    keys = [k for k in f.keys() if not k.endswith(".pad")]
            except Exception:  # an unreadable shard (disk trouble): ignore it, its items are recomputed
                continue
            for k in keys:
                self._where.setdefault(k, path)

    def missing(self, hashes: list[str]) -> list[str]:
        """The hashes (in first-seen order, without repeats) that the store does not hold yet."""
        self._scan()
        return [h for h in dict.fromkeys(hashes) if h not in self._where]

    def put(self, rows: dict[str, tuple[Tensor, Tensor | None]], layout: tuple[int, int]) -> None:
        """Write ``{hash: (tokens (T, D), pad (T,) or None)}`` as one new shard."""
        if not rows:
            return
        os.makedirs(self.folder, exist_ok=True)
        meta = os.path.join(self.folder, "meta.json")
        if not os.path.isfile(meta):
            atomic_write_bytes(meta, json.dumps(self.fingerprint, indent=2, default=str).encode())
        tensors = {}
        for h, (tokens, pad) in rows.items():
            tensors[h] = tokens.contiguous()
            if pad is not None:
                tensors[h + ".pad"] = pad.contiguous()
        metadata = {"n_prefix": str(layout[0]), "n_prompt": str(layout[1])}
        path = os.path.join(self.folder, f"shard-{uuid.uuid4().hex}.safetensors")
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
        self._scanned.add(path)
        for h in rows:
            self._where.setdefault(h, path)

    def get(self, hashes: list[str]) -> tuple[dict[str, tuple[Tensor, Tensor | None]], tuple[int, int]]:
        """Rows for ``hashes`` (all must be present) and the token layout (n_prefix, n_prompt)."""
        self._scan()
        by_shard: dict[str, list[str]] = {}
        for h in dict.fromkeys(hashes):
            by_shard.setdefault(self._where[h], []).append(h)
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        layouts = set()
        for path, wanted in by_shard.items():
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                layouts.add((int(meta.get("n_prefix", 0)), int(meta.get("n_prompt", 0))))
                keys = set(f.keys())
                for h in wanted:
                    pad = f.get_tensor(h + ".pad") if h + ".pad" in keys else None
                    out[h] = (f.get_tensor(h), pad)
        if len(layouts) > 1:
            raise ValueError(f"prefix cache {self.folder}: shards disagree on the token layout {layouts}")
        return out, layouts.pop() if layouts else (0, 0)

"""Resumable training checkpoints, written atomically (DESIGN §6).

A checkpoint is a folder ``<output>/checkpoints/ckpt-<seq>`` holding

- ``trainable.safetensors``: the trainable tensors only (``adapter_state_dict``),
- ``best.safetensors``: the best adapter so far (model selection survives a restart),
- ``trainer_state.pt``: optimizer, scheduler, RNG states (python, numpy, torch, CUDA, the data
  loader's generator), step, epoch, position in the epoch and the best metric; it is loaded with
  ``torch.load(weights_only=True)``, so reading it never runs code.

The folder is written under a temporary name and renamed into place, so a crash leaves either a
complete checkpoint or none; the newest complete one is found by its sequence number.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes, load_safetensors, public_mode, save_safetensors

STATE_NAME = "trainer_state.pt"
log = logging.getLogger("mmpeft")

WEIGHTS_NAME = "trainable.safetensors"
BEST_NAME = "best.safetensors"
_PATTERN = re.compile(r"^ckpt-(\d+)$")


def checkpoint_folders(root: str) -> list[tuple[int, str]]:
    """(sequence number, path) of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _PATTERN.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    folders = checkpoint_folders(root)
    return folders[-1][1] if folders else None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str, seq: int, state: dict, weights: dict, best: dict | None, keep: int = 1) -> str:
    """Write checkpoint number ``seq`` atomically and delete all but the newest ``keep``."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"ckpt-{seq:06d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-")
    try:
        public_mode(tmp)
        save_safetensors(weights, os.path.join(tmp, WEIGHTS_NAME))
        if best is not None:
            save_safetensors(best, os.path.join(tmp, BEST_NAME))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(os.path.join(tmp, STATE_NAME), buffer.getvalue())
        if os.path.exists(final):  # a leftover of a crashed run with the same number
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read (damaged on disk); the message names the file."""


def load_checkpoint(path: str) -> tuple[dict, dict, dict | None]:
    """(trainer state, trainable tensors, best adapter or None) of one checkpoint folder."""
    state_file = os.path.join(path, STATE_NAME)
    best_file = os.path.join(path, BEST_NAME)
    reading = state_file
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        reading = os.path.join(path, WEIGHTS_NAME)
        weights = load_safetensors(reading)
        reading = best_file
        best = load_safetensors(best_file) if os.path.isfile(best_file) else None
    except Exception as e:  # torch's own message suggests weights_only=False, which must never be used
        raise CheckpointError(
            f"cannot read checkpoint file {reading!r} ({type(e).__name__}): damaged"
        ) from None
    if not isinstance(state, dict) or not {"loop", "optimizer", "scheduler", "rng"} <= set(state):
        raise CheckpointError(f"{state_file!r} is not an mmpeft trainer state")
    return state, weights, best


# --- random number generators ------------------------------------------------------------------
def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state as tensors and builtins (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def load_newest_readable(root: str) -> tuple[str, dict, dict, dict | None] | None:
    """(path, state, weights, best) of the newest checkpoint under ``root`` that reads; a damaged one
    falls back to the one before (with a warning). None when there is none; CheckpointError when
    every one is damaged."""
    found = checkpoint_folders(root)
    for k, (_, path) in enumerate(reversed(found)):
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as e:
            if k == len(found) - 1:
                raise CheckpointError(
                    f"resume: {e}; no earlier checkpoint is readable. Start again with --overwrite"
                ) from None
            log.warning("resume: %s; trying the one before", e)
    return None


def to_model_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Checkpointed tensors (on the CPU) moved to where the model lives."""
    return {k: v.to(device) for k, v in tensors.items()}

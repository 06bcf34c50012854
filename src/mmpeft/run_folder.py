"""Guarding a run folder: ``--output`` on a folder that holds a run never overwrites it silently.

A run folder holds what ``Trainer`` writes (config.yaml, metrics.json, adapter/, checkpoints/,
tensorboard/). Training into one that already holds any of them would mix two runs: the new
config beside the old metrics, and a later ``--resume`` continuing the old checkpoints. So the
CLI asks first: ``--resume`` continues the run, ``--overwrite`` removes those entries (and only
those) before training starts, and anything else is refused with the folder's contents named.
"""

from __future__ import annotations

import os
import shutil

from .config import ConfigError

RUN_ENTRIES = ("config.yaml", "metrics.json", "adapter", "checkpoints", "tensorboard")


def run_entries(folder: str, entries: tuple[str, ...] = RUN_ENTRIES) -> list[str]:
    """The entries of a run that ``folder`` already holds."""
    return [e for e in entries if os.path.lexists(os.path.join(folder, e))]


def prepare_output(
    folder: str, *, resume: bool, overwrite: bool, command: str, entries: tuple[str, ...] = RUN_ENTRIES
) -> None:
    """Refuse to train into ``folder`` when it holds a run, unless resuming or overwriting it."""
    if resume and overwrite:
        raise ConfigError(
            f"{command}: --resume continues the run in {folder}, --overwrite replaces it; give one"
        )
    found = run_entries(folder, entries)
    if resume or not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{command}: {folder} already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with --overwrite, or choose another --output"
        )
    for e in found:
        path = os.path.join(folder, e)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

"""Pre-training encoders on a source task (DESIGN §2: the ``features`` encoder is trained on a source
task first and then frozen; a from-scratch image transformer gives block methods layers to act in).

A pretrain config is an ordinary run config whose encoders train fully: ``pretrain`` sets
``model.methods`` to ``[full]`` (a config that already lists only ``full`` keeps it), trains with the
ordinary ``Trainer`` and then, with the best-on-validation weights loaded, writes each encoder named
in ``save`` (default: all) with its family's own ``save_pretrained``::

    <output>/<modality>/     the encoder, loaded later with {type: <family>, path: <output>/<modality>}
    <output>/pretrain.json   source config, val/test metrics, date, mmpeft version, the specs to load
    <output>/run/            the training run (config.yaml, metrics.json, adapter/, checkpoints/)

Every check (modalities to save, families that can save) runs before anything is built.
Each encoder folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from typing import Any

from .checkpoint import atomic_write_bytes
from .config import ConfigError
from .registry import ENCODERS, closest
from .run_config import load_run_config, validate_run_config

log = logging.getLogger("mmpeft")

RUN_FOLDER = "run"
INFO_NAME = "pretrain.json"


def savable_families() -> list[str]:
    """Encoder families whose encoders can be written with ``save_pretrained``."""
    return [name for name, cls in ENCODERS.items() if callable(getattr(cls, "save_pretrained", None))]


def force_full(config: dict) -> dict:
    """The config with ``model.methods`` = ``[full]``, unless it already lists only ``full``."""
    config = copy.deepcopy(config)
    model = config.get("model")
    if not isinstance(model, dict):
        return config  # validation names the problem
    methods = model.get("methods") or []
    if methods and all(isinstance(m, dict) and m.get("name") == "full" for m in methods):
        return config
    if methods:
        names = [m.get("name") if isinstance(m, dict) else m for m in methods]
        log.warning("pretrain: model.methods %s replaced by [full] (pretraining trains the encoders)", names)
    model["methods"] = [{"name": "full"}]
    return config


def parse_save(save: str | list[str] | tuple[str, ...] | None, encoders: list[str]) -> list[str]:
    """``None`` -> every encoder; "audio,video" or a list -> those, checked against ``encoders``."""
    if save is None:
        return list(encoders)
    names = save.split(",") if isinstance(save, str) else list(save)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise ConfigError(f"pretrain: --save names no modality; the config's encoders are {encoders}")
    for name in names:
        if name not in encoders:
            raise ConfigError(
                f"pretrain: --save names modality {name!r}, which is not among the config's encoders "
                f"{encoders}; {closest(name, encoders)}"
            )
    return names


def check_pretrain_config(config: dict, save=None, reader=None) -> tuple[dict, list[str]]:
    """Validate a pretrain config and the modalities to save, before anything is built.

    Returns the config as it will train (method ``full``) and the modalities to save.
    """
    config = force_full(config)
    validated = validate_run_config(config, reader_class=type(reader) if reader is not None else None)
    encoders = validated.config["model"]["encoders"]
    names = parse_save(save, list(encoders))
    trained: set[str] = set()
    for entry in validated.config["model"]["methods"]:
        trained.update(entry.get("modalities") or encoders)
    for m in names:
        if m in (RUN_FOLDER, INFO_NAME, ".", "..") or any(c in m for c in "/\\"):
            raise ConfigError(f"pretrain: modality {m!r} cannot name a folder next to {RUN_FOLDER}/")
        if m not in trained:
            raise ConfigError(
                f"pretrain: encoder {m!r} is not trained (method full acts on {sorted(trained)}); "
                "it would be saved unchanged"
            )
        family = encoders[m]["type"]
        if family not in savable_families():
            raise ConfigError(
                f"pretrain: encoder family {family!r} (modality {m!r}) has no save_pretrained, so it cannot "
                f"be saved for a later run; families that can: {', '.join(savable_families())}"
            )
    return config, names


def replace_folder(tmp: str, target: str) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an older ``target``."""
    old = None
    if os.path.lexists(target):
        old = f"{target}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is None:
        return
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


def fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def save_encoder(encoder, output_dir: str, modality: str) -> str:
    """``encoder.save_pretrained`` into a temporary folder, then renamed to ``output_dir/modality``."""
    target = os.path.join(output_dir, modality)
    tmp = os.path.join(output_dir, f".{modality}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        encoder.save_pretrained(tmp)
        fsync_tree(tmp)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def describe(trainer, metrics: dict, output_dir: str, names: list[str], source: Any) -> dict[str, Any]:
    """The contents of ``pretrain.json``."""
    from . import __version__

    specs = trainer.config["model"]["encoders"]
    encoders = {}
    for m in names:
        spec = {"type": specs[m]["type"], "path": os.path.join(output_dir, m)}
        if specs[m].get("options"):
            spec["options"] = specs[m]["options"]
        encoders[m] = spec
    return {
        "mmpeft_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoders": encoders,
        "task": metrics["task"],
        "primary": metrics["primary"],
        "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epochs"],
        "steps": metrics["steps"],
        "train_time_s": metrics["train_time_s"],
        "val": metrics["val"],
        "test": metrics["test"],
        "source": source,
        "config": trainer.config,
    }


def pretrain(
    config: str | dict,
    output_dir: str,
    save: str | list[str] | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    reader=None,
    resume: bool = False,
    callbacks=(),
) -> dict[str, Any]:
    """Train the encoders of ``config`` fully on its task; save each one in ``save`` (default: all).

    ``config``: a run config (dict), a YAML file or a shipped config name, with dotted ``overrides``.
    The training run goes to ``output_dir/run`` (``resume=True`` continues it); the encoders to
    ``output_dir/<modality>``. Returns the contents of ``output_dir/pretrain.json``, whose
    ``encoders`` entries are the specs to put under ``model.encoders`` of a later run config.
    """
    from .train import Trainer

    source = {"config": config, "overrides": list(overrides)} if isinstance(config, str) else None
    config, names = check_pretrain_config(load_run_config(config, overrides), save, reader)
    run_dir = os.path.join(output_dir, RUN_FOLDER)
    trainer = Trainer(config, run_dir, reader=reader, callbacks=callbacks, resume=resume)
    metrics = trainer.fit()  # ends with the best-on-validation weights loaded
    info = describe(trainer, metrics, output_dir, names, source)
    if trainer.is_main:
        for m in names:
            path = save_encoder(trainer.model.backbone.encoders[m], output_dir, m)
            log.info("pretrain: saved encoder %r to %s", m, path)
        atomic_write_bytes(os.path.join(output_dir, INFO_NAME), json.dumps(info, indent=2).encode())
    trainer.accelerator.wait_for_everyone()
    return info


def ensure_pretrained(path: str, config: str, where: str) -> None:
    """Make the encoder folder ``path`` = ``<output>/<modality>`` by pretraining with ``config``
    (a shipped pretrain config or a YAML file) into ``<output>``, unless it exists. The first run
    that needs it pays once (like a dataset built on first use), an interrupted pretraining is
    resumed, and later runs load the folder."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path):
        return
    output, modality = os.path.split(os.path.normpath(path))
    encoders = list((load_run_config(config, []).get("model") or {}).get("encoders") or {})
    if modality not in encoders:
        raise ConfigError(
            f"{where}.pretrain: {config!r} saves encoders {encoders} into a folder each, so {where}.path "
            f"must end in one of them, got {path!r}"
        )
    log.info("%s: %s does not exist yet; pretraining it once with %r (mmpeft pretrain --config %s --output %s)",
             where, path, config, config, output)  # fmt: skip
    pretrain(config, output, resume=os.path.isdir(os.path.join(output, RUN_FOLDER)))  # a killed one continues
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: pretraining with {config!r} did not write {path!r}")

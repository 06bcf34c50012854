"""Building a run's parts from a validated config: reader, task, model (seeded), accelerator.

Training, ``mmpeft eval`` and ``mmpeft inspect`` all build through ``build_components`` so the
frozen random encoders of a toy run come out identical in each (same seed, same order).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..data.base import DatasetReader
from ..model import MultimodalModel, build_model
from ..optional import require
from ..run_config import ValidatedRun, validate_run_config

log = logging.getLogger("mmpeft")


@dataclass
class Components:
    validated: ValidatedRun
    config: dict
    """The resolved config (defaults filled in, head size from the task)."""
    reader: DatasetReader
    task: Any
    model: MultimodalModel
    info: dict


def seed_everything(seed: int) -> None:
    require("accelerate", "train").utils.set_seed(seed)


def check_modalities(reader: DatasetReader, encoders: dict) -> None:
    provided = list(reader.modalities)
    missing = [m for m in encoders if m not in provided]
    if missing:
        raise ConfigError(
            f"model.encoders has modalities {missing} that dataset {reader.name!r} does not provide; "
            f"it provides {provided}"
        )


def build_components(config: dict, reader: DatasetReader | None = None) -> Components:
    """Validate ``config`` completely, then seed and build reader, task and model."""
    validated = validate_run_config(config, reader_class=type(reader) if reader is not None else None)
    resolved = copy.deepcopy(validated.config)
    seed_everything(validated.train.seed)
    if reader is None:
        reader = validated.reader_class(validated.reader_config)
    check_modalities(reader, resolved["model"]["encoders"])
    info = reader.info()
    task = validated.task_class(validated.task_config)
    outputs = int(task.num_outputs(info))  # called even when the head size is given: tasks read info here
    if not validated.head_outputs_given:
        resolved["model"]["head"]["num_outputs"] = outputs
    try:
        model = build_model(resolved["model"])
    except ValueError as e:  # a method that does not fit these encoders (widths, depths, layers)
        raise ConfigError(f"model: {e}") from e
    task.prepare(model, info)
    return Components(validated, resolved, reader, task, model, info)


def use_cpu(train_cfg) -> bool:
    return train_cfg.cpu or not torch.cuda.is_available()


def release_other_precision(precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second Accelerator with another mixed
    precision; in a single process (runs, refits and trials one after another) forget the old one."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()


def make_accelerator(train_cfg, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator``: mixed precision from the config ("no" on CPU)."""
    accelerate = require("accelerate", "train")
    cpu = use_cpu(train_cfg)
    precision = train_cfg.mixed_precision
    if cpu and precision == "fp16":  # CPU autocast is bf16 only
        log.warning("train.mixed_precision=fp16 is ignored on the CPU (bf16 works there)")
        precision = "no"
    release_other_precision(precision)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # launched with an FSDP config: mmpeft shards the frozen blocks itself (train/sharding.py),
        # so Accelerate must not wrap the model; every run of this launch keeps train.fsdp on
        os.environ["MMPEFT_FSDP"], os.environ["ACCELERATE_USE_FSDP"] = "true", "false"
    handlers = []
    if find_unused_parameters:  # a method may leave parameters without gradient in a step
        handlers.append(accelerate.DistributedDataParallelKwargs(find_unused_parameters=True))
    return accelerate.Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers)


def compiled(module: torch.nn.Module, train_cfg) -> torch.nn.Module:
    """``torch.compile(module)`` under ``train.compile`` with its checked backend, else the module."""
    if not train_cfg.compile:
        return module
    backends = torch._dynamo.list_backends(exclude_tags=())
    if train_cfg.compile_backend not in backends:
        raise ConfigError(f"train.compile_backend {train_cfg.compile_backend!r} is not one of {backends}")
    return torch.compile(module, backend=train_cfg.compile_backend)
